#!/usr/bin/env bash
# Installs lego's programs, the runtime and the systemd units, as packaging would:
#   bazel build //... && daemons/install/install.sh [--prefix /usr/local] [--destdir DIR]
#   bazel run //:install -- --prefix=/usr/local            (the same, built first)
# Layout (PREFIX default /usr/local):
#   PREFIX/bin/{lego-run,lego-stat,lego-memd,lego-mond,lego-stord,lego-fs,lego-bench,fit-bench}
#   PREFIX/lib/lego/liblego_preload.so     (lego-run looks there: runtime/launcher/process.cc)
#   PREFIX/lib/systemd/system/lego-*@.service   (ExecStart= pointing at PREFIX/bin)
# The units read /etc/lego/cluster.toml and /etc/default/lego-*; see each unit's header.
# Then: systemctl daemon-reload && systemctl enable --now lego-memd@2 (and lego-mond@ID,
# lego-stord@ID on their nodes).
# --destdir DIR installs under DIR (a package's staging tree) with paths still for PREFIX.
# Where the built programs are: --bin DIR (default: bazel-bin of this checkout, or the
# runfiles under `bazel run`).
set -euo pipefail
prefix=/usr/local destdir="" bin=""
while (($#)); do
  case $1 in
    --prefix=*) prefix=${1#*=} ;;
    --prefix) prefix=$2; shift ;;
    --destdir=*) destdir=${1#*=} ;;
    --destdir) destdir=$2; shift ;;
    --bin=*) bin=${1#*=} ;;
    --bin) bin=$2; shift ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $prefix == /* ]] || { echo "install.sh: --prefix $prefix: not an absolute path" >&2; exit 2; }
# The checkout: `bazel run` sets BUILD_WORKSPACE_DIRECTORY (and has just built bazel-bin).
src=${BUILD_WORKSPACE_DIRECTORY:-$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)}
bin=${bin:-$src/bazel-bin}

# Every daemon with a unit (daemons/PKG/NAME@.service) is installed with it.
units=()
for u in "$src"/daemons/*/lego-*@.service; do units+=("${u#"$src"/}"); done
programs=(runtime/lego-run runtime/lego-stat runtime/fs/lego-fs runtime/bench/lego-bench libfit/bench/fit-bench)
for u in "${units[@]}"; do programs+=("${u%@.service}"); done
for p in "${programs[@]}" runtime/liblego_preload.so; do
  [[ -r $bin/$p ]] || { echo "install.sh: $bin/$p missing: bazel build //... first" >&2; exit 1; }
done
if ldd "$bin/runtime/liblego_preload.so" | grep -q libasan; then
  echo "install.sh: $bin holds an ASan build (bazel build --config=asan): rebuild without it" >&2
  exit 1
fi
d=$destdir$prefix
install -d "$d/bin" "$d/lib/lego" "$d/lib/systemd/system"
for p in "${programs[@]}"; do install -m 755 "$bin/$p" "$d/bin/"; done
install -m 755 "$bin/runtime/liblego_preload.so" "$d/lib/lego/"
for u in "${units[@]}"; do
  sed "s|/usr/local/bin/|$prefix/bin/|g" "$src/$u" >"$d/lib/systemd/system/${u##*/}"
  chmod 644 "$d/lib/systemd/system/${u##*/}"
done
echo "install.sh: installed into $d (bin/, lib/lego/, lib/systemd/system/)"
