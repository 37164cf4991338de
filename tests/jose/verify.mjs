// Verifies compact JWSs against a JWKS with the npm `jose` package, an independent
// JOSE implementation. stdin: {"jwks": {...}, "jws": ["h.p.s", ...]}.
// stdout: one JSON line per JWS: {"ok": true, "alg": ..., "kid": ..., "payload": base64url}
// or {"ok": false, "error": jose's error code}.
import { webcrypto } from 'node:crypto';

// Node 18 (Debian 12's nodejs) has WebCrypto's Ed25519 but not as globalThis.crypto,
// which jose uses: provide it before jose is loaded.
if (!globalThis.crypto) globalThis.crypto = webcrypto;
const jose = await import('jose');

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const keys = jose.createLocalJWKSet(input.jwks);
for (const jws of input.jws) {
  try {
    const { payload, protectedHeader } = await jose.compactVerify(jws, keys);
    console.log(JSON.stringify({
      ok: true,
      alg: protectedHeader.alg,
      kid: protectedHeader.kid,
      payload: Buffer.from(payload).toString('base64url'),
    }));
  } catch (err) {
    console.log(JSON.stringify({ ok: false, error: err.code || err.name }));
  }
}
