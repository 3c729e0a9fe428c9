#!/usr/bin/env bash
# Install voxanode as a systemd service: a venv under /opt/voxanode, the system user
# voxanode, the unit, the settings under /etc/voxanode and the data directory
# /var/lib/voxanode. Runs as root. A second run with the same source changes nothing:
# the package is reinstalled only when the source files differ from the last install,
# and an existing settings or bootstrap file is never overwritten.
set -euo pipefail

readonly PROGRAM="install.sh"
readonly SERVICE_NAME="voxanode"
readonly SERVICE_USER="voxanode"
readonly DOCKER_GROUP="docker"
readonly MIN_PYTHON="3.11"
readonly EXIT_USAGE=2
# The files setup.cfg builds the package from. They are copied to a build directory,
# hashed and installed from there, so the hash covers exactly what pip installs and
# pip writes nothing into the source tree.
readonly PACKAGE_DIRS=(voxanode voxacommunications_client)
readonly PACKAGE_FILES=(pyproject.toml setup.cfg README.md)
readonly STAMP_NAME="voxanode-install.stamp"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="/"
source_dir="$(dirname "${script_dir}")"
# The system Python: the service user must be able to run the venv's interpreter,
# and the unit's ProtectHome hides interpreters under /root and /home.
python="/usr/bin/python3"
[[ -x "${python}" ]] || python="python3"
use_systemctl=1
changes=0
build_dir=""

usage() {
    cat <<EOF
usage: ${PROGRAM} [--prefix DIR] [--source DIR] [--python PATH] [--no-systemctl]

Install voxanode as a systemd service. Run it as root; running it again is safe.

  --prefix DIR    root of the installation [default: /]. Use another root to stage or
                  test an installation: the venv's scripts name its Python by the path
                  under DIR, so that venv runs only at that path.
  --source DIR    voxanode source tree to install [default: ${source_dir}]
  --python PATH   Python ${MIN_PYTHON} or newer that creates the venv [default: /usr/bin/python3].
                  An existing venv that still starts is kept.
  --no-systemctl  do not run systemctl. It is also skipped when the prefix is not /
                  or when systemd is not running.
EOF
}

say() {
    echo "${PROGRAM}: $*"
}

die() {
    echo "${PROGRAM}: error: $*" >&2
    exit 1
}

warn() {
    echo "${PROGRAM}: warning: $*" >&2
}

usage_error() {
    echo "${PROGRAM}: error: $*" >&2
    echo "run '${PROGRAM} --help' for the options" >&2
    exit "${EXIT_USAGE}"
}

changed() {
    say "$*"
    changes=$((changes + 1))
}

cleanup() {
    if [[ -n "${build_dir}" ]]; then
        rm -rf "${build_dir}"
    fi
}

# Print PATH under the prefix.
root_path() {
    printf '%s%s' "${prefix%/}" "$1"
}

parse_options() {
    while (($# > 0)); do
        case "$1" in
            --prefix | --source | --python)
                (($# >= 2)) || usage_error "$1 needs a value"
                case "$1" in
                    --prefix) prefix="$2" ;;
                    --source) source_dir="$2" ;;
                    --python) python="$2" ;;
                esac
                shift 2
                ;;
            --no-systemctl)
                use_systemctl=0
                shift
                ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                usage_error "unknown option: $1"
                ;;
        esac
    done
}

check_environment() {
    ((EUID == 0)) || die "run as root: the script creates a system user and root-owned files"

    # useradd --root needs an absolute path, and "//opt" would show in messages.
    prefix="$(realpath -m -- "${prefix}")"
    source_dir="$(realpath -m -- "${source_dir}")"
    for name in "${PACKAGE_FILES[@]}" "${PACKAGE_DIRS[@]}" config/settings.json bootstrap_peers.json systemd/voxanode.service; do
        [[ -e "${source_dir}/${name}" ]] || die "${source_dir}/${name} not found; set --source to a voxanode source tree"
    done

    command -v "${python}" >/dev/null || die "Python not found: ${python}; set --python"
    "${python}" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))" \
        || die "${python} is older than Python ${MIN_PYTHON}; set --python to a newer one"
    "${python}" -c "import venv, ensurepip" 2>/dev/null \
        || die "${python} cannot create a venv; install Debian's python3-venv package or set --python"
    local real_python
    real_python="$("${python}" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')"
    case "${real_python}" in
        /root/* | /home/*)
            warn "${real_python} is under /root or /home: the voxanode user cannot run it, and the" \
                "unit's ProtectHome=yes hides it; use a system Python such as --python /usr/bin/python3"
            ;;
    esac
}

# Print the numeric id of a user (database passwd) or group (database group) under
# the prefix, or nothing when it does not exist.
lookup_id() {
    local database="$1" name="$2"
    if [[ "${prefix}" == / ]]; then
        getent "${database}" "${name}" | cut -d: -f3 || true
    elif [[ -f "$(root_path "/etc/${database}")" ]]; then
        awk -F: -v name="${name}" '$1 == name { print $3; exit }' "$(root_path "/etc/${database}")"
    fi
}

# Print the member list (comma-separated) of a group under the prefix.
group_members() {
    local name="$1"
    if [[ "${prefix}" == / ]]; then
        getent group "${name}" | cut -d: -f4 || true
    else
        awk -F: -v name="${name}" '$1 == name { print $4; exit }' "$(root_path /etc/group)"
    fi
}

# Print "MODE UID GID" of a path, MODE in octal without a leading zero.
owner_and_mode() {
    stat -c '%a %u %g' -- "$1"
}

# Create a directory, or fix the mode and owner of an existing one.
ensure_dir() {
    local path="$1" mode="$2" uid="$3" gid="$4"
    if [[ ! -d "${path}" ]]; then
        install -d -m "${mode}" -o "${uid}" -g "${gid}" -- "${path}"
        changed "created ${path} (mode ${mode}, owner ${uid}:${gid})"
    elif [[ "$(owner_and_mode "${path}")" != "${mode#0} ${uid} ${gid}" ]]; then
        chown "${uid}:${gid}" -- "${path}"
        chmod "${mode}" -- "${path}"
        changed "set ${path} to mode ${mode}, owner ${uid}:${gid}"
    else
        say "${path} is up to date"
    fi
}

ensure_user() {
    local -a root_option=()
    if [[ "${prefix}" != / ]]; then
        if [[ ! -f "$(root_path /etc/passwd)" || ! -f "$(root_path /etc/group)" ]]; then
            say "skipped user ${SERVICE_USER}: $(root_path /etc/passwd) or $(root_path /etc/group) is missing, so useradd --root cannot add it; files stay owned by root"
            return
        fi
        root_option=(--root "${prefix}")
    fi

    if [[ -z "$(lookup_id group "${SERVICE_USER}")" ]]; then
        groupadd "${root_option[@]}" --system "${SERVICE_USER}"
        changed "created system group ${SERVICE_USER}"
    else
        say "group ${SERVICE_USER} exists"
    fi

    if [[ -z "$(lookup_id passwd "${SERVICE_USER}")" ]]; then
        useradd "${root_option[@]}" --system --gid "${SERVICE_USER}" \
            --home-dir /var/lib/voxanode --no-create-home --shell /usr/sbin/nologin \
            --comment "voxanode daemon" "${SERVICE_USER}"
        changed "created system user ${SERVICE_USER}"
    else
        say "user ${SERVICE_USER} exists"
    fi

    if [[ -z "$(lookup_id group "${DOCKER_GROUP}")" ]]; then
        say "no ${DOCKER_GROUP} group: install Docker and run ${PROGRAM} again, because the unit's SupplementaryGroups=${DOCKER_GROUP} needs it"
    elif [[ ",$(group_members "${DOCKER_GROUP}")," == *",${SERVICE_USER},"* ]]; then
        say "user ${SERVICE_USER} is in group ${DOCKER_GROUP}"
    else
        usermod "${root_option[@]}" --append --groups "${DOCKER_GROUP}" "${SERVICE_USER}"
        changed "added user ${SERVICE_USER} to group ${DOCKER_GROUP}"
    fi
}

ensure_venv() {
    local venv="$1"
    # A venv whose base Python was removed or upgraded no longer starts: create it again.
    if "${venv}/bin/python" -I -B -c '' 2>/dev/null; then
        say "venv ${venv} exists"
        return
    fi
    mkdir -p -- "$(dirname "${venv}")"
    "${python}" -m venv --clear "${venv}"
    changed "created venv ${venv} with $("${venv}/bin/python" -I -B -c 'import sys; print(sys.version.split()[0])')"
}

# Copy the package sources into the build directory.
copy_sources() {
    tar -C "${source_dir}" --exclude=__pycache__ --exclude='*.pyc' -cf - \
        "${PACKAGE_FILES[@]}" "${PACKAGE_DIRS[@]}" | tar -C "${build_dir}" -xf -
}

# Print the SHA-256 over the paths and contents of every file in the build directory.
hash_sources() {
    (cd "${build_dir}" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) \
        | sha256sum | cut -d' ' -f1
}

# Print the installed version of the package in the venv, or nothing.
installed_version() {
    "$1/bin/python" -I -B -c '
import importlib.metadata
try:
    print(importlib.metadata.version("voxanode"))
except importlib.metadata.PackageNotFoundError:
    pass
' 2>/dev/null || true
}

ensure_package() {
    local venv="$1"
    local stamp="${venv}/${STAMP_NAME}"
    build_dir="$(mktemp -d)"
    copy_sources
    local source_hash version expected_stamp
    source_hash="$(hash_sources)"
    version="$(installed_version "${venv}")"

    # The stamp records the version and source hash of the last install. The package
    # is up to date when both still match.
    if [[ -n "${version}" && -f "${stamp}" ]]; then
        expected_stamp="$(printf 'version=%s\nsource_sha256=%s' "${version}" "${source_hash}")"
        if [[ "$(cat -- "${stamp}")" == "${expected_stamp}" ]]; then
            say "package voxanode ${version} is up to date (source sha256 ${source_hash:0:12})"
            return
        fi
    fi

    "${venv}/bin/python" -I -m pip install --quiet --disable-pip-version-check --no-input "${build_dir}"
    version="$(installed_version "${venv}")"
    [[ -n "${version}" ]] || die "pip reported success, but the venv ${venv} has no voxanode package"
    printf 'version=%s\nsource_sha256=%s\n' "${version}" "${source_hash}" >"${stamp}"
    chmod 0644 -- "${stamp}"
    changed "installed package voxanode ${version} from ${source_dir} (source sha256 ${source_hash:0:12})"
}

# Copy a file unless the target already has the same contents, mode and owner.
install_file() {
    local source="$1" target="$2" mode="$3" uid="$4" gid="$5"
    if [[ -f "${target}" ]] && cmp -s -- "${source}" "${target}" \
        && [[ "$(owner_and_mode "${target}")" == "${mode#0} ${uid} ${gid}" ]]; then
        say "${target} is up to date"
        return
    fi
    install -m "${mode}" -o "${uid}" -g "${gid}" -- "${source}" "${target}"
    changed "installed ${target}"
}

# Copy a file only when the target does not exist: an operator may have edited it.
install_file_once() {
    local source="$1" target="$2" mode="$3" uid="$4" gid="$5"
    if [[ -e "${target}" ]]; then
        say "kept ${target} as it is (never overwritten)"
        return
    fi
    install -m "${mode}" -o "${uid}" -g "${gid}" -- "${source}" "${target}"
    changed "installed ${target}"
}

# Print why systemctl is skipped, or nothing when it applies.
systemctl_skip_reason() {
    if ((use_systemctl == 0)); then
        echo "--no-systemctl was given"
    elif [[ "${prefix}" != / ]]; then
        echo "the prefix ${prefix} is not /"
    elif [[ ! -d /run/systemd/system ]]; then
        # The check sd_booted(3) makes.
        echo "systemd is not running as PID 1"
    fi
}

ensure_systemd_enabled() {
    local unit_changed="$1" reason
    reason="$(systemctl_skip_reason)"
    if [[ -n "${reason}" ]]; then
        say "skipped systemctl daemon-reload and enable: ${reason}"
        return
    fi
    if ((unit_changed)); then
        systemctl daemon-reload
        changed "ran systemctl daemon-reload"
    fi
    if systemctl is-enabled --quiet "${SERVICE_NAME}"; then
        say "${SERVICE_NAME}.service is enabled"
    else
        systemctl enable --quiet "${SERVICE_NAME}"
        changed "enabled ${SERVICE_NAME}.service; start it with: systemctl start ${SERVICE_NAME}"
    fi
}

main() {
    parse_options "$@"
    check_environment
    # The service user must read the venv, whatever root's umask is.
    umask 022
    trap cleanup EXIT
    say "installing from ${source_dir} into prefix ${prefix}"

    ensure_user
    local uid gid
    uid="$(lookup_id passwd "${SERVICE_USER}")"
    gid="$(lookup_id group "${SERVICE_USER}")"
    uid="${uid:-0}"
    gid="${gid:-0}"

    local venv
    venv="$(root_path /opt/voxanode/venv)"
    ensure_venv "${venv}"
    ensure_package "${venv}"

    local unit_target changes_before unit_changed
    unit_target="$(root_path "/etc/systemd/system/${SERVICE_NAME}.service")"
    mkdir -p -- "$(dirname "${unit_target}")"
    changes_before="${changes}"
    install_file "${source_dir}/systemd/voxanode.service" "${unit_target}" 0644 0 0
    unit_changed="$((changes > changes_before))"

    # The settings may contain the network key: readable by root and the service only.
    local config_dir
    config_dir="$(root_path /etc/voxanode)"
    mkdir -p -- "$(dirname "${config_dir}")"
    ensure_dir "${config_dir}" 0750 0 "${gid}"
    install_file_once "${source_dir}/config/settings.json" "${config_dir}/settings.json" 0640 0 "${gid}"
    install_file_once "${source_dir}/bootstrap_peers.json" "${config_dir}/bootstrap_peers.json" 0640 0 "${gid}"

    mkdir -p -- "$(root_path /var/lib)"
    ensure_dir "$(root_path /var/lib/voxanode)" 0700 "${uid}" "${gid}"

    ensure_systemd_enabled "${unit_changed}"

    if ((changes == 0)); then
        say "nothing changed: the installation is up to date"
    else
        say "done: ${changes} changes"
    fi
}

main "$@"
