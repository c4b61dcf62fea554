-- Notices and operators name a secret's project (issue 26): a row is reached through the names its `sources` element
-- holds (as referenced, and as Secret Manager answered: the project by number). An element Secret Manager answered
-- nothing for (a refusal: no `version`) cannot be told by project, so it carries "*", which every invalidation of its
-- secret's id reaches (refs.UNKNOWN_PROJECT). Rows written before this migration, ours and the copies, get it here.
CREATE OR REPLACE FUNCTION pg_temp.with_unknown_project(sources jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_agg(CASE WHEN e ? 'version' THEN e
                          ELSE jsonb_set(e, '{names}', coalesce(e->'names', '[]'::jsonb) || '["*"]'::jsonb) END
                     ORDER BY n)
    FROM jsonb_array_elements(sources) WITH ORDINALITY AS x(e, n)
$$;

UPDATE keychain SET sources = pg_temp.with_unknown_project(sources)
WHERE jsonb_typeof(sources) = 'array' AND EXISTS (SELECT 1 FROM jsonb_array_elements(sources) e WHERE NOT e ? 'version');

UPDATE keychain_copy SET sources = pg_temp.with_unknown_project(sources)
WHERE jsonb_typeof(sources) = 'array' AND EXISTS (SELECT 1 FROM jsonb_array_elements(sources) e WHERE NOT e ? 'version');

DROP FUNCTION pg_temp.with_unknown_project(jsonb);
