#!/usr/bin/env bash
# gofmt, go vet, staticcheck, and the import graph of docs/architecture.md
# (golangci-lint with depguard alone, .golangci.yml).
set -euo pipefail
export PATH="$(go env GOPATH)/bin:$PATH"
fail=0

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "lint: gofmt would change these files (run gofmt -w):"; echo "$unformatted"; fail=1
fi

go vet ./... || fail=1
staticcheck ./... || fail=1

# The import graph of docs/architecture.md ("Packages"): depguard's rules
# in .golangci.yml.
golangci-lint run ./... || fail=1

exit $fail
