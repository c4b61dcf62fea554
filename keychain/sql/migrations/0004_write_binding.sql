-- Each ciphertext is bound to its write: a random 63-bit write id, chosen when the value is sealed, is part of the
-- associated data (format 2). An earlier ciphertext of the same row written back into `data` no longer matches
-- the row's write id and fails to decrypt. Rows sealed before this migration (format 1) have no write id; they
-- keep decrypting until `keychain rekey` (or the next write) seals them in format 2, and a format 1 ciphertext is
-- refused in a row that has a write id.
ALTER TABLE keychain ADD COLUMN write_id BIGINT;
