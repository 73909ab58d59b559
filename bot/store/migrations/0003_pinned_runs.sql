-- A run pinned to a process is executed and reported by that process only. `kubeci run`
-- pins its run, so a `kubeci serve` sharing the database (with its own secrets and
-- public URL) never picks up its attempts or outbox rows, and the reverse.
ALTER TABLE runs ADD COLUMN pinned_to text;
