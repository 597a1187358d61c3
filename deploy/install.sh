#!/usr/bin/env bash
# `make install` / `make uninstall`: hanabi on a systemd host (Debian 12, root).
#
# install puts
#   /opt/hanabi/.venv              its own venv: hanabi and its pinned dependencies (pyproject.toml)
#   /opt/hanabi/README.md, docs/   what the units' Documentation= points at
#   /etc/systemd/system/           hanabi.target and the four Type=notify units (deploy/systemd)
#   /etc/hanabi/hanabi.toml        the commented default config (kept if one is already there)
#   /usr/local/bin/hanabi-*        links to the venv's commands (only where no other file is)
#   /etc/docker/daemon.json        the hanabi, hanabi-qemu, hanabi-fc runtimes (hanabi-runtime install-docker)
# and records in /opt/hanabi/MANIFEST what it put outside /opt/hanabi; uninstall removes
# exactly that: it stops and disables the units, unregisters the runtimes (and removes a
# daemon.json it created, if nothing else was added to it since), removes the units, the links,
# the config if it is unchanged (a changed one is kept, and said so), and /opt/hanabi.
# State (/var/lib/hanabi, /var/log/hanabi, /run/hanabi) is left: it is the daemons', not the install's.
#
# Environment: PYTHON (python3), WHEELHOUSE (install offline from these wheels only: a dir with
# the hanabi wheel and its dependencies, as `pip wheel . -w DIR` makes), DAEMON_JSON
# (/etc/docker/daemon.json), NO_DOCKER=1 (do not register the Docker runtimes).
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/hanabi                 # the units name /opt/hanabi/.venv/bin/...: not movable
unit_dir=/etc/systemd/system
config_dir=/etc/hanabi
bin_dir=/usr/local/bin
daemon_json=${DAEMON_JSON:-/etc/docker/daemon.json}
python=${PYTHON:-python3}
units=(hanabi.target hanabi-vmmd.service hanabi-netd.service hanabi-blockd.service hanabi-agentd.service hanabi-zygote.service)
commands=(hanabi-runtime hanabi-vmmd hanabi-netd hanabi-blockd hanabi-agentd hanabi-zygote hanabi-image)
manifest=$prefix/MANIFEST

die() { echo "hanabi install: $*" >&2; exit 1; }
systemd_running() { [ -d /run/systemd/system ]; }

install_all() {
  [ "$(id -u)" = 0 ] || die "run as root"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than 3.11"
  local was_active=0
  if systemd_running; then
    if systemctl -q is-active hanabi.target "${units[@]:1}" 2>/dev/null; then was_active=1; fi
    systemctl stop hanabi.target "${units[@]:1}" 2>/dev/null || true   # the venv they run from is replaced
  fi
  rm -rf "$prefix/.venv"
  mkdir -p "$prefix"
  "$python" -m venv "$prefix/.venv"
  local pip=("$prefix/.venv/bin/pip" install -q --no-cache-dir --disable-pip-version-check)
  if [ -n "${WHEELHOUSE:-}" ]; then
    local version
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$src/pyproject.toml")
    "${pip[@]}" --no-index --find-links "$WHEELHOUSE" "hanabi==$version"
  else  # from a copy: the build writes build/ and *.egg-info, never into the checkout (which may be read-only)
    local copy
    copy=$(mktemp -d)
    cp -r "$src/pyproject.toml" "$src/libs" "$src/services" "$src/guest" "$copy/"
    "${pip[@]}" "$copy" || { rm -rf "$copy"; die "pip install failed"; }
    rm -rf "$copy"
  fi
  install -m 0644 "$src/README.md" "$prefix/README.md"
  rm -rf "$prefix/docs"; cp -r "$src/docs" "$prefix/docs"
  install -m 0644 "$src/deploy/hanabi.toml" "$prefix/hanabi.toml.default"

  : >"$manifest.new"
  for unit in "${units[@]}"; do
    install -m 0644 "$src/deploy/systemd/$unit" "$unit_dir/$unit"
    echo "unit $unit_dir/$unit" >>"$manifest.new"
  done
  mkdir -p "$config_dir"
  if [ -e "$config_dir/hanabi.toml" ]; then
    echo "keeping the config already at $config_dir/hanabi.toml (the default is $prefix/hanabi.toml.default)"
  else
    install -m 0644 "$src/deploy/hanabi.toml" "$config_dir/hanabi.toml"
  fi
  echo "config $config_dir/hanabi.toml" >>"$manifest.new"
  for cmd in "${commands[@]}"; do
    local link=$bin_dir/$cmd target=$prefix/.venv/bin/$cmd
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then :
    elif [ -e "$link" ] || [ -L "$link" ]; then echo "not linking $link: something else is there"; continue
    else mkdir -p "$bin_dir"; ln -s "$target" "$link"; fi
    echo "link $link" >>"$manifest.new"
  done
  if [ "${NO_DOCKER:-0}" != 1 ]; then
    local out docker_dir
    docker_dir=$(dirname "$daemon_json")
    if [ ! -d "$docker_dir" ]; then echo "dir-created $docker_dir" >>"$manifest.new"
    elif grep -q "^dir-created $docker_dir\$" "$manifest" 2>/dev/null; then echo "dir-created $docker_dir" >>"$manifest.new"; fi
    out=$("$prefix/.venv/bin/hanabi-runtime" install-docker --daemon-json "$daemon_json" \
          --runtime-path "$prefix/.venv/bin/hanabi-runtime")
    echo "$out"
    if grep -q "(created)" <<<"$out"; then echo "docker-json-created $daemon_json" >>"$manifest.new"
    elif grep -q "^docker-json-created $daemon_json\$" "$manifest" 2>/dev/null; then
      echo "docker-json-created $daemon_json" >>"$manifest.new"   # a reinstall keeps what the first one made
    fi
    echo "docker-json $daemon_json" >>"$manifest.new"
    reload_docker "$out"
  fi
  mv "$manifest.new" "$manifest"
  if systemd_running; then
    systemctl daemon-reload
    if [ $was_active = 1 ]; then systemctl start hanabi.target && echo "hanabi.target started again"; fi
  fi
  echo "hanabi installed in $prefix. Next: $prefix/.venv/bin/hanabi-image build (the guest image), then"
  echo "  systemctl enable --now hanabi.target"
}

reload_docker() {
  if grep -q "reload dockerd" <<<"$1" && systemd_running && systemctl -q is-active docker 2>/dev/null; then
    systemctl reload docker && echo "dockerd reloaded"
  fi
}

uninstall_all() {
  [ "$(id -u)" = 0 ] || die "run as root"
  [ -f "$manifest" ] || die "$manifest is missing: hanabi is not installed by \`make install\` here"
  if systemd_running; then systemctl stop "${units[@]}" || true; fi
  systemctl --no-reload disable "${units[@]}" 2>/dev/null || true
  local kind path created=""
  created=$(awk '$1 == "docker-json-created" {print $2}' "$manifest")
  while read -r kind path; do
    case $kind in
      unit) rm -f "$path" ;;
      link) if [ -L "$path" ] && [ "$(readlink "$path")" = "$prefix/.venv/bin/$(basename "$path")" ]; then rm -f "$path"; fi ;;
      config)
        if cmp -s "$path" "$prefix/hanabi.toml.default"; then rm -f "$path"; rmdir "$(dirname "$path")" 2>/dev/null || true
        elif [ -e "$path" ]; then echo "keeping $path: it was changed (or was there before the install)"; fi ;;
      docker-json)
        local out
        out=$("$prefix/.venv/bin/hanabi-runtime" uninstall-docker --daemon-json "$path")
        echo "$out"
        if [ "$path" = "$created" ] && [ "$(tr -d ' \n' <"$path")" = "{}" ]; then rm -f "$path"; echo "removed $path (the install had created it)"
        else reload_docker "$out"; fi ;;
      docker-json-created) ;;
      dir-created) ;;
      *) echo "hanabi uninstall: unknown manifest line: $kind $path" >&2 ;;
    esac
  done <"$manifest"
  awk '$1 == "dir-created" {print $2}' "$manifest" | while read -r path; do rmdir "$path" 2>/dev/null || true; done
  rmdir "$unit_dir/hanabi.target.wants" 2>/dev/null || true
  if systemd_running; then systemctl daemon-reload; systemctl reset-failed "${units[@]}" 2>/dev/null || true; fi
  rm -rf "$prefix"
  echo "hanabi uninstalled (state in /var/lib/hanabi, /var/log/hanabi and /run/hanabi is left)"
}

case ${1:-} in
  install) install_all ;;
  uninstall) uninstall_all ;;
  *) die "usage: $0 install|uninstall" ;;
esac
