// The till's calls to the API (same origin): keys, sync uploads, the redemptions feed.

export const JWKS_PATH = "/.well-known/jwks.json";
// The server takes at most 1000 entries per upload (API.md, Redemptions).
export const SYNC_BATCH = 1000;
export const FEED_PAGE = 1000;
// A till catching up reads at most this many feed pages per sync; the rest comes next time.
export const FEED_MAX_PAGES = 50;
// Header the service worker adds when it answers the JWKS from its cache (network down).
export const CACHED_AT_HEADER = "X-Till-Cached-At";
const TIMEOUT_MS = 15000;

/** The server could not be reached (offline, down, or too slow). */
export class Unreachable extends Error {}

/** The server answered with an error status. */
export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function send(path, options = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  try {
    return await fetch(path, { ...options, signal: controller.signal });
  } catch (exc) {
    throw new Unreachable(exc && exc.name === "AbortError" ? "no answer in time" : "offline");
  } finally {
    clearTimeout(timer);
  }
}

async function failure(response) {
  let message = `${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message += ` ${body.error.message}`;
  } catch {
    // not our JSON error body (a proxy's page): the status says enough
  }
  return new HttpError(response.status, message);
}

function bearer(token) {
  return { Authorization: `Bearer ${token}` };
}

/** The server's JWKS: {document, cachedAt} (cachedAt is set when it came from the cache). */
export async function fetchJwks() {
  const response = await send(JWKS_PATH, {
    cache: "no-cache", // revalidate (ETag): a rotation must reach the till
    headers: { Accept: "application/json" },
  });
  if (!response.ok) throw await failure(response);
  return { document: await response.json(), cachedAt: response.headers.get(CACHED_AT_HEADER) };
}

/** Upload entries ({entry_id, token, redeemed_at}); the server's results, in the order sent. */
export async function upload(merchantToken, deviceId, entries) {
  const response = await send("/v1/redemptions/sync", {
    method: "POST",
    cache: "no-store",
    headers: { "Content-Type": "application/json", ...bearer(merchantToken) },
    body: JSON.stringify({ device_id: deviceId, entries }),
  });
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  if (!body || !Array.isArray(body.results)) throw new HttpError(response.status, "answer not understood");
  return body.results;
}

/**
 * One page of the merchant's redemptions after `cursor` (GET /v1/redemptions):
 * {redemptions, next}, or null when this server has no feed yet (404 / 405).
 */
export async function readFeed(merchantToken, cursor) {
  const query = new URLSearchParams({ limit: String(FEED_PAGE) });
  if (cursor) query.set("after", cursor);
  const response = await send(`/v1/redemptions?${query}`, {
    cache: "no-store",
    headers: { Accept: "application/json", ...bearer(merchantToken) },
  });
  if (response.status === 404 || response.status === 405) return null;
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  if (!body || !Array.isArray(body.redemptions)) throw new HttpError(response.status, "answer not understood");
  return { redemptions: body.redemptions, next: typeof body.next === "string" ? body.next : cursor };
}
