#!/usr/bin/env bash
# check-install.sh — what the README promises a newcomer about installs:
# `make build` and `make demo` install Debian packages only (no linters, no
# csi-sanity), and every pinned Go tool is an exact semantic version, the only
# form the module proxy serves. (That each pin resolves is proven by `make
# tools`, which fetches every pin afresh.)
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
for target in build demo; do
	if make -n "$target" 2>/dev/null | grep -E -- '--tools|go install' >/dev/null; then
		echo "check-install: make $target would install Go tools:" >&2
		make -n "$target" | grep -E -- '--tools|go install' >&2
		fail=1
	fi
done
# GO_TOOLS (make tools) and K8S_GO_TOOLS (make k8s-deps: helm) alike.
n=0
for list in GO_TOOLS K8S_GO_TOOLS; do
	while read -r name pkg version; do
		if [[ ! $version =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
			echo "check-install: $name ($pkg) pinned at '$version': not an exact vX.Y.Z version" >&2
			fail=1
		fi
	done < <(sed -n "/^$list=(/,/^)/{s/^\t\"\(.*\)\"\$/\1/p}" e2e/install-deps.sh)
	k=$(sed -n "/^$list=(/,/^)/p" e2e/install-deps.sh | grep -c '^\s*"' || true)
	[[ $k -gt 0 ]] || { echo "check-install: no $list found in e2e/install-deps.sh" >&2; fail=1; }
	n=$((n + k))
done
[[ $fail -eq 0 ]] && echo "check-install: build/demo install no Go tools; $n pinned Go tools, all exact versions"
exit $fail
