-- Notices and operators name a secret's project (issue 26): a row is reached through the names its `sources` element
-- holds (as referenced, and as Secret Manager answered: the project by number). An element Secret Manager answered
-- nothing for (a refusal: no `version`) cannot be told by project, so it carries "*", which every invalidation of its
-- secret's id reaches (refs.UNKNOWN_PROJECT). Rows written before this migration get it here.
UPDATE keychain k SET sources = (
    SELECT jsonb_agg(CASE WHEN e ? 'version' THEN e
                          ELSE jsonb_set(e, '{names}', coalesce(e->'names', '[]'::jsonb) || '["*"]'::jsonb) END
                     ORDER BY n)
    FROM jsonb_array_elements(k.sources) WITH ORDINALITY AS x(e, n))
WHERE jsonb_typeof(k.sources) = 'array' AND jsonb_array_length(k.sources) > 0
  AND EXISTS (SELECT 1 FROM jsonb_array_elements(k.sources) e WHERE NOT e ? 'version');

UPDATE keychain_copy c SET sources = (
    SELECT jsonb_agg(CASE WHEN e ? 'version' THEN e
                          ELSE jsonb_set(e, '{names}', coalesce(e->'names', '[]'::jsonb) || '["*"]'::jsonb) END
                     ORDER BY n)
    FROM jsonb_array_elements(c.sources) WITH ORDINALITY AS x(e, n))
WHERE jsonb_typeof(c.sources) = 'array' AND jsonb_array_length(c.sources) > 0
  AND EXISTS (SELECT 1 FROM jsonb_array_elements(c.sources) e WHERE NOT e ? 'version');
