#!/usr/bin/env bash
# System packages the test suite uses beyond PyPI: Chromium for the browser tests (driven through Playwright, no
# browser download) and the full Fashion-MNIST for the tests that render training scenes (attnscope itself
# ships the test split). Installs them through apt when run as root; otherwise says what will be skipped.
set -euo pipefail
need=()
if [ -z "${ATTNSCOPE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  need+=(chromium fonts-dejavu-core)
fi
if [ -z "${ATTNSCOPE_FASHION_MNIST:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  need+=(dataset-fashion-mnist)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages for the tests: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "note: not root (or no apt-get), so these system packages are not installed: ${need[*]}" >&2
  case " ${need[*]} " in *" chromium "*) echo "      the browser tests will be skipped (no Chromium);" >&2;; esac
  case " ${need[*]} " in *" dataset-fashion-mnist "*) echo "      the tests that render training scenes will be skipped (no full Fashion-MNIST);" >&2;; esac
  echo "      install them with: sudo apt-get install ${need[*]}  (or set ATTNSCOPE_CHROMIUM / ATTNSCOPE_FASHION_MNIST)" >&2
fi
