-- 0002: the lifecycle (docs/lifecycle.md). A deal is archived once PostgreSQL holds every
-- event of it; its Redis keys are then removed and PostgreSQL answers for it.

-- When the archiver found the deal complete here (set once, before the deal's Redis keys
-- are removed; NULL while Redis holds it).
ALTER TABLE deals ADD COLUMN archived_at timestamptz;

-- /metrics counts archived deals on every scrape.
CREATE INDEX deals_archived ON deals (archived_at) WHERE archived_at IS NOT NULL;

-- The archiver counts a deal's first redemptions; reconcile and rebuild-redis read them
-- per deal too.
CREATE INDEX redemptions_deal ON redemptions (deal_id);

-- A deal with a dead-lettered event is not complete here: the archiver leaves it in Redis.
CREATE INDEX dead_letters_deal ON dead_letters ((fields ->> 'deal'));
