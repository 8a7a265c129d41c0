// The till's service worker (scope /verifier/): the page, its modules and the QR reader are
// kept in a cache so the till opens with the network gone, across reloads and browser
// restarts; the last JWKS is kept too. API calls (sync, feed) always go to the network.
//
// The page and its files: answered from the cache at once, refreshed from the network
// behind it (the next load gets what changed). The JWKS: network first, the cache when the
// network fails (answered with an X-Till-Cached-At header, so the page can say so).

const SHELL_CACHE = "till-shell-v1";
const KEYS_CACHE = "till-keys-v1";
const JWKS_PATH = "/.well-known/jwks.json";
const CACHED_AT_HEADER = "X-Till-Cached-At";
const SCOPE_PATH = new URL("./", self.location).pathname; // "/verifier/"
const SHELL = [
  "./",
  "./index.html",
  "./till.css",
  "./app.js",
  "./jws.js",
  "./store.js",
  "./server.js",
  "./scan.js",
  "./manifest.json",
  "./icon.svg",
  "./vendor/jsQR.js",
];

self.addEventListener("install", (event) => {
  event.waitUntil(
    (async () => {
      const cache = await caches.open(SHELL_CACHE);
      await cache.addAll(SHELL.map((path) => new Request(path, { cache: "reload" })));
      await self.skipWaiting();
    })(),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    (async () => {
      const keep = new Set([SHELL_CACHE, KEYS_CACHE]);
      for (const name of await caches.keys()) {
        if (!keep.has(name)) await caches.delete(name);
      }
      await self.clients.claim();
    })(),
  );
});

async function shell(event, url) {
  const cache = await caches.open(SHELL_CACHE);
  const key = url.pathname; // cache-busting query strings share one copy
  const cached = await cache.match(key);
  const fresh = fetch(event.request, { cache: "no-cache" }).then(async (response) => {
    if (response.ok && response.type === "basic") await cache.put(key, response.clone());
    return response;
  });
  if (cached) {
    event.waitUntil(fresh.catch(() => undefined)); // offline: the cached copy stands
    return cached;
  }
  return fresh;
}

async function jwks(event) {
  const cache = await caches.open(KEYS_CACHE);
  try {
    const response = await fetch(event.request);
    if (response.ok) {
      const copy = response.clone();
      const headers = new Headers(copy.headers);
      headers.set(CACHED_AT_HEADER, new Date().toISOString());
      await cache.put(JWKS_PATH, new Response(await copy.blob(), { status: 200, headers }));
    }
    return response;
  } catch (exc) {
    const cached = await cache.match(JWKS_PATH);
    if (cached) return cached;
    throw exc;
  }
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname === JWKS_PATH) {
    event.respondWith(jwks(event));
  } else if (url.pathname.startsWith(SCOPE_PATH)) {
    event.respondWith(shell(event, url));
  }
  // Anything else (the API) goes to the network as if there were no service worker.
});
