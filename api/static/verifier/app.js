// The till's page: wires the controls of API.md ("The same verifier runs in a browser") to
// verification (jws.js), the log (store.js), the server (server.js) and the camera (scan.js).

import { Refused, importJwks, unverifiedPayload, verifyVoucher } from "./jws.js";
import { Scanner } from "./scan.js";
import {
  FEED_MAX_PAGES,
  FEED_PAGE,
  HttpError,
  SYNC_BATCH,
  Unreachable,
  fetchJwks,
  readFeed,
  upload,
} from "./server.js";
import * as store from "./store.js";

const STATUSES = ["accepted", "duplicate", "conflict", "rejected"];
const RECENT_MAX = 6;

const $ = (id) => document.getElementById(id);
const ui = {
  tokenField: $("merchant-token"),
  save: $("save"),
  merchant: $("merchant"),
  refresh: $("refresh"),
  keys: $("keys"),
  feed: $("feed"),
  voucher: $("voucher"),
  scan: $("scan"),
  camera: $("camera"),
  video: $("camera-video"),
  closeCamera: $("close-camera"),
  cameraNote: $("camera-note"),
  result: $("result"),
  outcome: $("outcome"),
  recent: $("recent"),
  sync: $("sync"),
  unsynced: $("unsynced"),
  syncResult: $("sync-result"),
  syncDetails: $("sync-details"),
  network: $("network"),
};

const state = {
  merchantToken: null,
  merchantId: null,
  keys: null, // kid -> CryptoKey
  keysAt: null,
  deviceId: null,
};

const scanner = new Scanner(ui.video);

function localTime(iso) {
  if (!iso) return "an unknown time";
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? iso : at.toLocaleString();
}

// -- the merchant ------------------------------------------------------------------------

function merchantOf(token) {
  let payload;
  try {
    payload = unverifiedPayload(token); // HS256: only the server can check it
  } catch {
    throw new Error("this is not a merchant token");
  }
  if (typeof payload.sub !== "string" || !payload.sub) throw new Error("the token names no merchant");
  if (payload.role !== undefined && payload.role !== "merchant") {
    throw new Error(`this is a ${payload.role}'s token, not a merchant's`);
  }
  return { id: payload.sub, exp: typeof payload.exp === "number" ? payload.exp : null };
}

function showMerchant(note) {
  if (!state.merchantId) {
    ui.merchant.textContent = note || "No merchant token saved: paste it and press Save.";
    return;
  }
  let text = `Merchant: ${state.merchantId}`;
  try {
    const { exp } = merchantOf(state.merchantToken);
    if (exp !== null && exp * 1000 <= Date.now()) text += " (token expired: Sync needs a new one)";
  } catch {
    // saved tokens were checked when saved
  }
  ui.merchant.textContent = note ? `${text}. ${note}` : text;
}

async function saveMerchant() {
  const token = ui.tokenField.value.trim();
  let merchant;
  try {
    merchant = merchantOf(token);
  } catch (exc) {
    showMerchant(`Not saved: ${exc.message}.`);
    return;
  }
  await store.setMeta("merchant_token", token);
  state.merchantToken = token;
  state.merchantId = merchant.id;
  ui.tokenField.value = ""; // the token is a secret: do not leave it on screen
  showMerchant("Saved.");
  await showUnsynced();
  ui.voucher.focus();
  if (navigator.onLine) await pullFeed();
}

// -- keys --------------------------------------------------------------------------------

function showKeys(note) {
  const count = state.keys ? state.keys.size : 0;
  let text = count
    ? `Keys: ${count}, refreshed ${localTime(state.keysAt)}`
    : "No keys yet: press Refresh keys when online.";
  if (note) text += `. ${note}`;
  ui.keys.textContent = text;
}

async function refreshKeys() {
  ui.refresh.disabled = true;
  try {
    const { document: jwks, cachedAt } = await fetchJwks();
    const keys = await importJwks(jwks);
    if (cachedAt) {
      // The service worker's copy: the network is down. Adopt it only if we had none.
      if (!state.keys) {
        state.keys = keys;
        state.keysAt = cachedAt;
        await store.setMeta("jwks", { document: jwks, fetched_at: cachedAt });
      }
      showKeys("Offline: keeping these keys");
      return false;
    }
    const now = new Date().toISOString();
    await store.setMeta("jwks", { document: jwks, fetched_at: now });
    state.keys = keys;
    state.keysAt = now;
    showKeys();
    return true;
  } catch (exc) {
    if (exc instanceof Unreachable) showKeys("Offline: keeping these keys");
    else if (exc instanceof HttpError) showKeys(`The server answered ${exc.message}; keys not updated`);
    else showKeys(`The server's keys are unusable (${exc.message}); keys not updated`);
    return false;
  } finally {
    ui.refresh.disabled = false;
  }
}

async function loadSavedKeys() {
  const saved = await store.getMeta("jwks");
  if (!saved) return;
  try {
    state.keys = await importJwks(saved.document);
    state.keysAt = saved.fetched_at;
  } catch {
    state.keys = null;
  }
}

// -- checks ------------------------------------------------------------------------------

function showOutcome(kind, text) {
  ui.result.className = `result ${kind}`;
  ui.result.querySelector(".icon").textContent = kind === "ok" ? "\u2714" : "\u2716";
  ui.outcome.textContent = text;
  ui.result.dataset.checks = String(Number(ui.result.dataset.checks || 0) + 1);
  const item = document.createElement("li");
  item.className = kind;
  const when = document.createElement("time");
  when.textContent = new Date().toLocaleTimeString();
  item.append(when, ` ${text}`);
  ui.recent.prepend(item);
  while (ui.recent.children.length > RECENT_MAX) ui.recent.lastElementChild.remove();
}

async function checkToken(raw) {
  const token = String(raw).trim();
  if (!token) return;
  if (!state.merchantId) {
    showOutcome("bad", "Refused: this till has no merchant token yet (paste it and press Save)");
    return;
  }
  if (!state.keys) {
    showOutcome("bad", "Refused: this till has no keys yet (press Refresh keys when online)");
    return;
  }
  let voucher;
  try {
    voucher = await verifyVoucher(token, state.keys, state.merchantId);
  } catch (exc) {
    if (!(exc instanceof Refused)) throw exc;
    showOutcome("bad", `Refused: ${exc.reason}`);
    return;
  }
  const result = await store.redeem(voucher, token);
  if (result.outcome === "accepted") {
    showOutcome("ok", `Accepted: voucher ${voucher.voucherId}`);
  } else if (result.outcome === "here") {
    showOutcome("bad", `Already redeemed here at ${localTime(result.entry.redeemed_at)}`);
  } else {
    const device = result.seen.device_id ? ` (${result.seen.device_id})` : "";
    showOutcome("bad", `Already redeemed on another till${device} at ${localTime(result.seen.redeemed_at)}`);
  }
  await showUnsynced();
}

// A wedge scanner can send the next token before a check finishes: checks run one at a time.
let checking = Promise.resolve();
function check(raw) {
  checking = checking.then(() => checkToken(raw)).catch((exc) => {
    showOutcome("bad", `Refused: the till failed to check it (${exc && exc.message})`);
  });
  return checking;
}

// -- sync --------------------------------------------------------------------------------

async function showUnsynced() {
  ui.unsynced.value = String(await store.countUnsynced(state.merchantId));
}

async function pullFeed() {
  if (!state.merchantToken) return;
  const merchantId = state.merchantId;
  const cursorName = `feed_cursor:${merchantId}`;
  let cursor = (await store.getMeta(cursorName)) || null;
  let learned = 0;
  try {
    for (let page = 0; page < FEED_MAX_PAGES; page++) {
      const answer = await readFeed(state.merchantToken, cursor);
      if (answer === null) {
        ui.feed.textContent = "Other tills' redemptions: this server has no feed yet.";
        return;
      }
      const others = answer.redemptions.filter((r) => r && r.device_id !== state.deviceId);
      await store.learn(merchantId, others);
      learned += others.length;
      cursor = answer.next;
      await store.setMeta(cursorName, cursor);
      if (answer.redemptions.length < FEED_PAGE) break;
    }
    ui.feed.textContent = `Other tills' redemptions: up to date at ${new Date().toLocaleTimeString()} (${learned} new).`;
  } catch (exc) {
    const why = exc instanceof Unreachable ? "offline" : exc.message;
    ui.feed.textContent = `Other tills' redemptions: not updated (${why}).`;
  }
}

async function sync() {
  if (!state.merchantToken) {
    ui.syncResult.textContent = "Sync needs a merchant token: paste it and press Save.";
    return;
  }
  ui.sync.disabled = true;
  ui.syncResult.textContent = "Syncing\u2026";
  ui.syncDetails.replaceChildren();
  const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
  const notes = [];
  let uploads = 0;
  let reached = true;
  try {
    // Each batch is marked as soon as it is answered; a failure leaves the rest for next time.
    for (let round = 0; round < 1000; round++) {
      const batch = await store.unsynced(state.merchantId, SYNC_BATCH);
      if (!batch.length) break;
      const entries = batch.map((e) => ({ entry_id: e.entry_id, token: e.token, redeemed_at: e.redeemed_at }));
      const results = await upload(state.merchantToken, state.deviceId, entries);
      uploads += 1;
      await store.markSynced(batch, results);
      const sent = new Map(batch.map((e) => [e.entry_id, e]));
      const answered = results.filter((r) => r && sent.has(r.entry_id));
      for (const r of answered) {
        if (r.status in counts) counts[r.status] += 1;
        if (r.status === "conflict" || r.status === "rejected") {
          const entry = sent.get(r.entry_id);
          const why = r.status === "conflict" ? `first redeemed at ${localTime(r.first_redeemed_at)}` : r.code;
          notes.push(`${r.status}: voucher ${entry.voucher_id} (${why})`);
        }
      }
      if (answered.length < batch.length) {
        notes.push("the server did not answer every entry: press Sync again");
        break;
      }
    }
    const summary = STATUSES.map((s) => `${counts[s]} ${s}`).join(", ");
    ui.syncResult.textContent = `Synced: ${summary}${uploads ? "" : " (nothing to upload)"}`;
  } catch (exc) {
    if (exc instanceof Unreachable) {
      reached = false;
      ui.syncResult.textContent = "Sync failed: the server cannot be reached. Entries wait for the next Sync.";
    } else if (exc instanceof HttpError && (exc.status === 401 || exc.status === 403)) {
      ui.syncResult.textContent = `Sync refused (${exc.message}): save a new merchant token.`;
    } else {
      ui.syncResult.textContent = `Sync failed (${exc.message}): press Sync again.`;
    }
  }
  for (const note of notes) {
    const item = document.createElement("li");
    item.textContent = note;
    ui.syncDetails.append(item);
  }
  try {
    await showUnsynced();
    if (reached) {
      await refreshKeys();
      await pullFeed();
    }
  } finally {
    ui.sync.disabled = false;
  }
}

// -- camera ------------------------------------------------------------------------------

async function openCamera() {
  ui.camera.hidden = false;
  ui.cameraNote.textContent = "Point the camera at the voucher's QR code.";
  try {
    await scanner.start((text) => {
      closeCamera();
      check(text);
    });
    ui.camera.dataset.decoder = scanner.decoderName;
    ui.cameraNote.textContent = `Point the camera at the voucher's QR code (reading with ${scanner.decoderName}).`;
  } catch (exc) {
    scanner.stop();
    ui.cameraNote.textContent = `No camera (${exc && exc.name ? exc.name : exc}): allow the camera for this page, or type the voucher.`;
  }
}

function closeCamera() {
  scanner.stop();
  ui.camera.hidden = true;
  ui.voucher.focus();
}

// -- start -------------------------------------------------------------------------------

function showNetwork() {
  const ready = navigator.serviceWorker && navigator.serviceWorker.controller ? "Works offline" : "Not yet ready to work offline";
  ui.network.textContent = `${navigator.onLine ? "Online" : "Offline"} \u00b7 ${ready}`;
}

async function start() {
  ui.save.addEventListener("click", saveMerchant);
  ui.tokenField.addEventListener("keydown", (event) => {
    if (event.key === "Enter") saveMerchant();
  });
  ui.refresh.addEventListener("click", refreshKeys);
  ui.voucher.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault();
    const token = ui.voucher.value;
    ui.voucher.value = ""; // ready for the next scan at once
    check(token);
  });
  ui.scan.addEventListener("click", openCamera);
  ui.closeCamera.addEventListener("click", closeCamera);
  ui.sync.addEventListener("click", sync);
  addEventListener("online", () => {
    showNetwork();
    refreshKeys().then(pullFeed);
  });
  addEventListener("offline", showNetwork);

  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.addEventListener("controllerchange", showNetwork);
    navigator.serviceWorker.register("./sw.js", { scope: "./" }).catch((exc) => {
      ui.network.textContent = `Cannot work offline here (${exc.message})`;
    });
  }
  showNetwork();

  state.deviceId = await store.deviceId();
  const token = await store.getMeta("merchant_token");
  if (token) {
    try {
      state.merchantId = merchantOf(token).id;
      state.merchantToken = token;
    } catch {
      state.merchantToken = null;
    }
  }
  showMerchant();
  await loadSavedKeys();
  showKeys();
  await showUnsynced();
  ui.voucher.focus();
  document.body.dataset.ready = "1";
  if (navigator.onLine) {
    await refreshKeys();
    await pullFeed();
  }
}

start();
