// The till's state in IndexedDB: settings, the redemption log, what other tills redeemed.
//
//   meta       name -> value: merchant token, device id, cached JWKS, feed cursors
//   log        keyed by voucher id (jti): one redemption per voucher on this till, with its
//              entry id, token and device time; `pending` (1) until the server answered it
//   elsewhere  keyed by voucher id: redemptions learned from GET /v1/redemptions
//
// A check records in one readwrite transaction that reads both stores and adds to `log`,
// so two scans of one voucher racing in two tabs still accept once (the key decides).

const DB_NAME = "flashsale-till";
const DB_VERSION = 1;

let opening = null;

function promised(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.addEventListener("complete", () => resolve());
    tx.addEventListener("abort", () => reject(tx.error || new Error("transaction aborted")));
  });
}

export function openDb() {
  if (!opening) {
    const request = indexedDB.open(DB_NAME, DB_VERSION);
    request.onupgradeneeded = () => {
      const db = request.result;
      db.createObjectStore("meta");
      const log = db.createObjectStore("log", { keyPath: "voucher_id" });
      log.createIndex("pending", ["pending", "merchant_id", "redeemed_at"]);
      db.createObjectStore("elsewhere", { keyPath: "voucher_id" });
    };
    opening = promised(request);
  }
  return opening;
}

export async function getMeta(name) {
  const db = await openDb();
  return promised(db.transaction("meta").objectStore("meta").get(name));
}

export async function setMeta(name, value) {
  const db = await openDb();
  const tx = db.transaction("meta", "readwrite");
  tx.objectStore("meta").put(value, name);
  await done(tx);
}

/** This till's id for sync uploads, made up once and kept. */
export async function deviceId() {
  let id = await getMeta("device_id");
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    id = "till-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    await setMeta("device_id", id);
  }
  return id;
}

/**
 * Record a verified voucher as redeemed now, unless this till knows it was redeemed.
 * Returns {outcome: "accepted", entry} | {outcome: "here", entry} | {outcome: "elsewhere", seen}.
 */
export async function redeem(voucher, token) {
  const db = await openDb();
  // A till may lose power: the redemption is on disk before the shopkeeper sees Accepted.
  const tx = db.transaction(["log", "elsewhere"], "readwrite", { durability: "strict" });
  const finished = done(tx);
  const log = tx.objectStore("log");
  let result;
  log.get(voucher.voucherId).onsuccess = (event) => {
    const entry = event.target.result;
    if (entry) {
      result = { outcome: "here", entry };
      return;
    }
    tx.objectStore("elsewhere").get(voucher.voucherId).onsuccess = (event2) => {
      const seen = event2.target.result;
      if (seen) {
        result = { outcome: "elsewhere", seen };
        return;
      }
      const fresh = {
        voucher_id: voucher.voucherId,
        merchant_id: voucher.merchantId,
        entry_id: crypto.randomUUID(),
        token,
        redeemed_at: new Date().toISOString(), // device time, RFC 3339 UTC with Z
        pending: 1,
      };
      log.add(fresh);
      result = { outcome: "accepted", entry: fresh };
    };
  };
  await finished; // the add is durable once the transaction completes
  return result;
}

function pendingRange(merchantId) {
  return IDBKeyRange.bound([1, merchantId, ""], [1, merchantId, "\uffff"]);
}

/** Up to `limit` entries of `merchantId` not yet answered by the server, oldest first. */
export async function unsynced(merchantId, limit) {
  const db = await openDb();
  const index = db.transaction("log").objectStore("log").index("pending");
  return promised(index.getAll(pendingRange(merchantId), limit));
}

export async function countUnsynced(merchantId) {
  if (!merchantId) return 0;
  const db = await openDb();
  const index = db.transaction("log").objectStore("log").index("pending");
  return promised(index.count(pendingRange(merchantId)));
}

/** Store the server's answers ({entry_id, status, code}) on the entries sent (by voucher id). */
export async function markSynced(sent, results) {
  const byEntry = new Map(sent.map((entry) => [entry.entry_id, entry]));
  const db = await openDb();
  const tx = db.transaction("log", "readwrite", { durability: "strict" });
  const log = tx.objectStore("log");
  const syncedAt = new Date().toISOString();
  for (const result of results) {
    const entry = byEntry.get(result.entry_id);
    if (!entry) continue;
    const { pending: _pending, ...answered } = entry; // leaving the index: no longer pending
    log.put({
      ...answered,
      sync_status: result.status,
      sync_code: result.code || null,
      first_redeemed_at: result.first_redeemed_at || null,
      synced_at: syncedAt,
    });
  }
  await done(tx);
}

/** Remember redemptions made on other tills (from the feed). */
export async function learn(merchantId, redemptions) {
  if (!redemptions.length) return;
  const db = await openDb();
  const tx = db.transaction("elsewhere", "readwrite");
  const store = tx.objectStore("elsewhere");
  for (const r of redemptions) {
    if (typeof r.voucher_id !== "string" || !r.voucher_id) continue;
    store.put({
      voucher_id: r.voucher_id,
      merchant_id: merchantId,
      redeemed_at: r.redeemed_at || null,
      device_id: r.device_id || null,
    });
  }
  await done(tx);
}
