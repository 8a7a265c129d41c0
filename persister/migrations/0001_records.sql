-- 0001: the durable records of API.md, written by the persister from the partition streams.
--
-- Every write is keyed by the producer's ids (deal id, voucher id, (deal, seq)), so
-- at-least-once delivery lands each event exactly once. No foreign keys: a stream is
-- read by several consumers and a claim may be committed before its deal's row.

-- Milliseconds since the epoch (the streams' unit) <-> timestamptz, exactly.
CREATE FUNCTION fs_ms(ms bigint) RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT timestamptz 'epoch' + ms * interval '1 millisecond' $$;

CREATE FUNCTION fs_to_ms(t timestamptz) RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT (extract(epoch FROM t) * 1000)::bigint $$;

-- A cancellation may be committed by one consumer before another commits the deal
-- itself: it then inserts the row with only id and cancelled_at, and the deal event
-- fills the rest in. Hence the nullable columns; `reconcile` names any row left so.
CREATE TABLE deals (
    id              text PRIMARY KEY,
    merchant_id     text,
    title           text,
    description     text,
    lat             double precision,
    lng             double precision,
    inventory_total integer,
    starts_at       timestamptz,
    ends_at         timestamptz,
    redeem_until    timestamptz,
    created_at      timestamptz,
    cancelled_at    timestamptz
);
CREATE INDEX deals_merchant ON deals (merchant_id);

CREATE TABLE vouchers (
    id         text PRIMARY KEY,
    deal_id    text NOT NULL,
    seq        integer NOT NULL,
    user_id    text NOT NULL,
    claimed_at timestamptz NOT NULL,
    -- API.md's unique (deal_id, user_id), with user_id first so that the same index
    -- also finds a user's vouchers for GET /v1/me/vouchers (which then sorts that
    -- user's few rows): a separate (user_id, claimed_at, id) index cost about a fifth
    -- of the persister's insert throughput (docs/persister.md).
    CONSTRAINT vouchers_deal_user UNIQUE (user_id, deal_id),
    CONSTRAINT vouchers_deal_seq UNIQUE (deal_id, seq)
);

-- The first accepted redemption of each voucher.
CREATE TABLE redemptions (
    voucher_id  text PRIMARY KEY,
    deal_id     text NOT NULL,
    merchant_id text NOT NULL,
    redeemed_at timestamptz NOT NULL,
    device_id   text NOT NULL DEFAULT '',
    entry_id    text NOT NULL DEFAULT ''
);

-- Later redemptions of an already redeemed voucher, kept for review. Keyed as the
-- producer keys them (lua/redeem_voucher.lua): voucher, merchant, entry.
CREATE TABLE redemption_conflicts (
    id                bigserial PRIMARY KEY,
    voucher_id        text NOT NULL,
    deal_id           text NOT NULL,
    merchant_id       text NOT NULL,
    redeemed_at       timestamptz NOT NULL,
    first_redeemed_at timestamptz,
    device_id         text NOT NULL DEFAULT '',
    entry_id          text NOT NULL DEFAULT '',
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT redemption_conflicts_key UNIQUE (voucher_id, merchant_id, entry_id)
);

-- Stream entries that could not be written (malformed, or refused by PostgreSQL after
-- several attempts): acknowledged so that they stop blocking, kept here for a human.
CREATE TABLE dead_letters (
    id        bigserial PRIMARY KEY,
    stream    text NOT NULL,
    entry_id  text NOT NULL,
    fields    jsonb NOT NULL,
    error     text NOT NULL,
    attempts  integer NOT NULL DEFAULT 1,
    failed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letters_entry UNIQUE (stream, entry_id)
);

-- Claims whose (deal_id, seq) or (deal_id, user_id) is already held by another voucher:
-- Redis went back in time (failover, restore). Never dropped silently.
CREATE TABLE parked_vouchers (
    voucher_id         text PRIMARY KEY,
    deal_id            text NOT NULL,
    seq                integer NOT NULL,
    user_id            text NOT NULL,
    claimed_at         timestamptz NOT NULL,
    clash_seq_voucher  text,
    clash_user_voucher text,
    stream             text NOT NULL,
    entry_id           text NOT NULL,
    parked_at          timestamptz NOT NULL DEFAULT now()
);
