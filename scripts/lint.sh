#!/usr/bin/env bash
# gofmt, go vet, staticcheck, and the layering rules of docs/architecture.md.
set -euo pipefail
export PATH="$(go env GOPATH)/bin:$PATH"
fail=0

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "lint: gofmt would change these files (run gofmt -w):"; echo "$unformatted"; fail=1
fi

go vet ./... || fail=1
staticcheck ./... || fail=1

# nbdserver/nbd and nbdserver/volume never import each other, directly or
# through another package; chunkstore imports neither.
mod=$(go list -m)
forbid() { # forbid PKG DEP
  if go list -deps "$mod/$1" | grep -qx "$mod/$2"; then
    echo "lint: $1 must not import $2 (see docs/architecture.md)"; fail=1
  fi
}
forbid nbdserver/nbd nbdserver/volume
forbid nbdserver/volume nbdserver/nbd
forbid chunkstore nbdserver/nbd
forbid chunkstore nbdserver/volume
forbid nbdserver/nbd chunkstore

# No product package needs the tests' harness (tests may import it).
for p in $(go list "$mod/..." | grep -v "^$mod/integration"); do
  if go list -deps "$p" | grep -q "^$mod/integration"; then
    echo "lint: $p must not import $mod/integration/... (test harness)"; fail=1
  fi
done

# The source host's packages know nothing of the server (but its wire
# protocol, nbdserver/nbd), the repository or the CLI.
for p in $(go list "$mod/client/..."); do
  for dep in "$mod/nbdserver" "$mod/nbdserver/volume" "$mod/nbdserver/lease" "$mod/chunkstore" github.com/urfave/cli; do
    if go list -deps "$p" | grep -q "^$dep\(/v[0-9]*\)\?$"; then
      echo "lint: $p must not import $dep (see docs/architecture.md)"; fail=1
    fi
  done
done

# client/leg parses outside bytes: the standard library only.
if go list -deps "$mod/client/leg" | grep -v -x "$mod/client/leg" | grep -q '\.'; then
  echo "lint: client/leg must import only the standard library (see docs/architecture.md):"
  go list -deps "$mod/client/leg" | grep -v -x "$mod/client/leg" | grep '\.'; fail=1
fi

exit $fail
