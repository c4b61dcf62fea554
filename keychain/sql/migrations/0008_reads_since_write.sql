-- The hit path in one plain statement. Whether a read is the first since the value was written (the warm's lead
-- time) was a sub-select of the row as it was before the UPDATE, a second index lookup on every read. A counter
-- reset by every write answers it from the row itself: the read that makes it 1 is the first. Not indexed, so a
-- read stays a HOT update.
ALTER TABLE keychain ADD COLUMN reads_since_write INTEGER NOT NULL DEFAULT 0;
