#!/usr/bin/env bash
# Re-create the till's vendored browser code from the pinned npm lock file:
#   api/static/verifier/vendor/jsQR.js          <- node_modules/jsqr/dist/jsQR.js (as published)
#   api/static/verifier/vendor/jsQR.LICENSE     <- node_modules/jsqr/LICENSE (Apache-2.0)
# The built file is copied unchanged (no bundler, no build step): the page loads it with
# `import()`, and its UMD header puts `jsQR` on `self`. Needs node and npm; run it after
# changing package.json (then `npm install` updates package-lock.json) and commit the result.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --ignore-scripts --no-audit --no-fund
out=../verifier/vendor
mkdir -p "$out"
cp node_modules/jsqr/dist/jsQR.js "$out/jsQR.js"
cp node_modules/jsqr/LICENSE "$out/jsQR.LICENSE"
rm -rf node_modules
sha256sum "$out/jsQR.js" "$out/jsQR.LICENSE"
