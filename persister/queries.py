"""The persister's SQL, as named constants (never built from input).

Batch writes are ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING``: one
statement per table per batch, idempotent under redelivery. Rows are inserted in key
order (except vouchers, see there) so that two persisters writing overlapping batches
take locks in the same order.
"""

INSERT_DEALS = """
INSERT INTO deals (id, merchant_id, title, description, lat, lng, inventory_total,
                   starts_at, ends_at, redeem_until, created_at)
SELECT u.id, u.merchant_id, u.title, u.description, u.lat, u.lng, u.total,
       fs_ms(u.starts), fs_ms(u.ends), fs_ms(u.redeem), fs_ms(u.created)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[],
            $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[])
     AS u(id, merchant_id, title, description, lat, lng, total, starts, ends, redeem, created)
ORDER BY u.id
ON CONFLICT (id) DO UPDATE SET
    merchant_id = EXCLUDED.merchant_id, title = EXCLUDED.title,
    description = EXCLUDED.description, lat = EXCLUDED.lat, lng = EXCLUDED.lng,
    inventory_total = EXCLUDED.inventory_total, starts_at = EXCLUDED.starts_at,
    ends_at = EXCLUDED.ends_at, redeem_until = EXCLUDED.redeem_until,
    created_at = EXCLUDED.created_at
WHERE deals.merchant_id IS NULL  -- only fill in a row a cancellation created first
"""

# The earliest cancellation wins; a cancellation that arrives before its deal creates
# the row with just the id (the deal event fills it in).
UPSERT_CANCELS = """
INSERT INTO deals (id, cancelled_at)
SELECT u.id, fs_ms(u.at) FROM unnest($1::text[], $2::int8[]) AS u(id, at)
ORDER BY u.id
ON CONFLICT (id) DO UPDATE SET cancelled_at =
    LEAST(COALESCE(deals.cancelled_at, EXCLUDED.cancelled_at), EXCLUDED.cancelled_at)
"""

INSERT_VOUCHERS = """
WITH ins AS (
    INSERT INTO vouchers (id, deal_id, seq, user_id, claimed_at)
    SELECT u.id, u.deal_id, u.seq, u.user_id, timestamptz 'epoch' + u.at * interval '1 ms'
    FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[])
         AS u(id, deal_id, seq, user_id, at)
    -- No ORDER BY on the hot path (it costs a quarter of the throughput): batches only
    -- overlap on redelivery, and a deadlock there is retried as a transient clash.
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM ins
"""

# Claims that did not insert and whose voucher id is not there either: another voucher
# holds their (deal_id, seq) or (deal_id, user_id). Redis went back in time: park them.
PARK_VOUCHERS = """
INSERT INTO parked_vouchers (voucher_id, deal_id, seq, user_id, claimed_at,
                             clash_seq_voucher, clash_user_voucher, stream, entry_id)
SELECT u.id, u.deal_id, u.seq, u.user_id, fs_ms(u.at),
       (SELECT v.id FROM vouchers v WHERE v.deal_id = u.deal_id AND v.seq = u.seq),
       (SELECT v.id FROM vouchers v WHERE v.deal_id = u.deal_id AND v.user_id = u.user_id),
       u.stream, u.entry_id
FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::text[], $7::text[])
     AS u(id, deal_id, seq, user_id, at, stream, entry_id)
WHERE NOT EXISTS (SELECT 1 FROM vouchers v WHERE v.id = u.id)
ON CONFLICT (voucher_id) DO NOTHING
RETURNING voucher_id, deal_id, seq, user_id, clash_seq_voucher, clash_user_voucher
"""

INSERT_REDEMPTIONS = """
INSERT INTO redemptions (voucher_id, deal_id, merchant_id, redeemed_at, device_id, entry_id)
SELECT u.voucher_id, u.deal_id, u.merchant_id, fs_ms(u.at), u.device_id, u.entry_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[])
     AS u(voucher_id, deal_id, merchant_id, at, device_id, entry_id)
ORDER BY u.voucher_id
ON CONFLICT (voucher_id) DO NOTHING
"""

# A redeem event for a voucher whose stored first redemption is another one (Redis went
# back in time) is kept as a conflict, never dropped.
REDEMPTIONS_TO_CONFLICTS = """
INSERT INTO redemption_conflicts (voucher_id, deal_id, merchant_id, redeemed_at,
                                  first_redeemed_at, device_id, entry_id)
SELECT u.voucher_id, u.deal_id, u.merchant_id, fs_ms(u.at), r.redeemed_at,
       u.device_id, u.entry_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[])
     AS u(voucher_id, deal_id, merchant_id, at, device_id, entry_id)
JOIN redemptions r ON r.voucher_id = u.voucher_id
WHERE (r.merchant_id, r.redeemed_at, r.device_id, r.entry_id)
      IS DISTINCT FROM (u.merchant_id, fs_ms(u.at), u.device_id, u.entry_id)
ORDER BY u.voucher_id
ON CONFLICT (voucher_id, merchant_id, entry_id) DO NOTHING
"""

INSERT_CONFLICTS = """
INSERT INTO redemption_conflicts (voucher_id, deal_id, merchant_id, redeemed_at,
                                  first_redeemed_at, device_id, entry_id)
SELECT u.voucher_id, u.deal_id, u.merchant_id, fs_ms(u.at), fs_ms(u.first_at),
       u.device_id, u.entry_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],
            $7::int8[])
     AS u(voucher_id, deal_id, merchant_id, at, device_id, entry_id, first_at)
ORDER BY u.voucher_id
ON CONFLICT (voucher_id, merchant_id, entry_id) DO NOTHING
"""

INSERT_DEAD_LETTERS = """
INSERT INTO dead_letters (stream, entry_id, fields, error, attempts)
SELECT u.stream, u.entry_id, u.fields::jsonb, u.error, u.attempts
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[])
     AS u(stream, entry_id, fields, error, attempts)
ORDER BY u.stream, u.entry_id
ON CONFLICT (stream, entry_id) DO UPDATE SET
    error = EXCLUDED.error, attempts = dead_letters.attempts + EXCLUDED.attempts,
    failed_at = now()
"""

# -- reconcile and rebuild ----------------------------------------------------------

SELECT_DEALS = """
SELECT id, merchant_id, title, description, lat, lng, inventory_total,
       fs_to_ms(starts_at) AS starts, fs_to_ms(ends_at) AS ends,
       fs_to_ms(redeem_until) AS redeem, fs_to_ms(created_at) AS created,
       fs_to_ms(cancelled_at) AS cancelled, archived_at IS NOT NULL AS archived
FROM deals
WHERE id > $1
ORDER BY id
LIMIT $2
"""

SELECT_DEALS_BY_ID = """
SELECT *, fs_to_ms(cancelled_at) AS cancelled FROM deals WHERE id = ANY($1::text[])
"""

SELECT_VOUCHERS_OF_DEALS = """
SELECT id, deal_id, seq, user_id, fs_to_ms(claimed_at) AS claimed
FROM vouchers
WHERE deal_id = ANY($1::text[])
"""

SELECT_REDEMPTIONS_OF_DEALS = """
SELECT voucher_id, deal_id, merchant_id, fs_to_ms(redeemed_at) AS redeemed,
       device_id, entry_id
FROM redemptions
WHERE deal_id = ANY($1::text[])
"""
