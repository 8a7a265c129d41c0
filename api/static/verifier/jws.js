// Voucher verification with WebCrypto: the checks of the CLI till (verifier/verify.py),
// in the same order, with the same reasons. Pure: no DOM, no storage.

export const ISSUER = "flashsale";
export const TOKEN_TYPE = "vch+jwt";
export const ALGORITHM = "ES256";
export const MAX_TOKEN_CHARS = 2048;

// Three base64url segments and nothing else (no padding, no stray characters).
const COMPACT = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;
const B64URL = /^[A-Za-z0-9_-]*$/;
const REQUIRED = ["iss", "aud", "sub", "jti", "deal", "iat", "exp"];
const ECDSA_P256 = { name: "ECDSA", namedCurve: "P-256" };
const ES256_VERIFY = { name: "ECDSA", hash: "SHA-256" };

/** A token this till must not accept; `reason` is what the shopkeeper reads. */
export class Refused extends Error {
  constructor(reason) {
    super(reason);
    this.reason = reason;
  }
}

/** Strict unpadded base64url to bytes; throws on anything else. */
export function b64urlDecode(text) {
  if (!B64URL.test(text) || text.length % 4 === 1) throw new Error("not base64url");
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function jsonSegment(segment) {
  const value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(b64urlDecode(segment)));
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Error("not a JSON object");
  }
  return value;
}

/** The payload of a JWT, unverified (for the merchant token: the till only needs its `sub`). */
export function unverifiedPayload(token) {
  const parts = String(token).trim().split(".");
  if (parts.length !== 3) throw new Error("not a JWT");
  return jsonSegment(parts[1]);
}

/**
 * The usable ES256 public keys of a JWKS document, imported for WebCrypto, by kid.
 * Throws if there are none (the cached keys are then left as they were).
 */
export async function importJwks(document) {
  if (!document || !Array.isArray(document.keys)) throw new Error("not a JWKS document");
  const keys = new Map();
  for (const jwk of document.keys) {
    if (!jwk || jwk.kty !== "EC" || jwk.crv !== "P-256") continue;
    if (typeof jwk.kid !== "string" || !jwk.kid || jwk.d !== undefined) continue; // never a private key
    try {
      const key = await crypto.subtle.importKey(
        "jwk",
        { kty: "EC", crv: "P-256", x: jwk.x, y: jwk.y, ext: true },
        ECDSA_P256,
        false,
        ["verify"],
      );
      keys.set(jwk.kid, key);
    } catch {
      // an unusable key is skipped, as the CLI till does
    }
  }
  if (keys.size === 0) throw new Error("the JWKS holds no usable P-256 key");
  return keys;
}

function isInt(value) {
  return typeof value === "number" && Number.isSafeInteger(value);
}

/**
 * Check a scanned token for `merchantId` with the cached keys only.
 * Returns the voucher's claims; throws `Refused` with the reason.
 */
export async function verifyVoucher(token, keys, merchantId, nowS = Date.now() / 1000) {
  token = String(token).trim(); // scanner noise
  if (!token || token.length > MAX_TOKEN_CHARS || !COMPACT.test(token)) {
    throw new Refused("malformed token");
  }
  const [h, p, s] = token.split(".");
  let header;
  try {
    header = jsonSegment(h);
  } catch {
    throw new Refused("malformed token");
  }
  if (header.alg !== ALGORITHM) throw new Refused("bad signature (algorithm is not ES256)");
  if (header.typ !== TOKEN_TYPE) throw new Refused("not a voucher (typ is not vch+jwt)");
  if (Object.keys(header).some((name) => !["alg", "kid", "typ"].includes(name))) {
    throw new Refused("malformed token (unexpected header parameters)");
  }
  const kid = header.kid;
  if (typeof kid !== "string" || !kid) throw new Refused("unknown key (no kid)");
  const key = keys.get(kid);
  if (!key) throw new Refused(`unknown key ${kid} (press Refresh keys when online)`);
  let signature;
  try {
    signature = b64urlDecode(s);
  } catch {
    throw new Refused("malformed token");
  }
  // JWS carries raw r||s (64 bytes), which WebCrypto takes; a DER signature is not ES256.
  if (signature.length !== 64) throw new Refused("bad signature (not a 64-byte ES256 signature)");
  const signed = new TextEncoder().encode(`${h}.${p}`);
  if (!(await crypto.subtle.verify(ES256_VERIFY, key, signature, signed))) {
    throw new Refused("bad signature");
  }
  let claims;
  try {
    claims = jsonSegment(p);
  } catch {
    throw new Refused("malformed token (payload)");
  }
  const missing = REQUIRED.filter((name) => !(name in claims));
  if (missing.length) throw new Refused(`malformed token (missing ${missing.join(", ")})`);
  if (claims.iss !== ISSUER) throw new Refused("not a voucher (wrong issuer)");
  for (const name of ["aud", "sub", "jti", "deal"]) {
    if (typeof claims[name] !== "string" || !claims[name]) {
      throw new Refused(`malformed token (${name})`);
    }
  }
  for (const name of ["iat", "exp"]) {
    if (!isInt(claims[name])) throw new Refused(`malformed token (${name})`);
  }
  if (claims.aud !== merchantId) throw new Refused("another merchant's voucher");
  if (nowS >= claims.exp) throw new Refused("expired");
  return {
    voucherId: claims.jti,
    dealId: claims.deal,
    userId: claims.sub,
    merchantId: claims.aud,
    issuedAtS: claims.iat,
    expiresAtS: claims.exp,
    kid,
  };
}
