#!/usr/bin/env bash
# Apply this repo's patch series to a host submodule.
#
# Usage:
#   scripts/apply_patches.sh [--check] [--mirror DIR] <Host>|all
#
#   <Host>   a submodule path at the repo top level (LLaVA-NeXT, LLaVA-3D, Chat-Scene, LISA, ...)
#   all      the four hosts listed in ALL_HOSTS below
#   --check  dry run: apply the series with `git am` on a temporary, detached worktree of the
#            submodule at the pinned commit, then delete the worktree. The submodule's HEAD,
#            index and work tree are left exactly as they were.
#   --mirror DIR
#            offline initialisation: a submodule that is not checked out yet is cloned from the
#            local mirror DIR/<Host>.git (or DIR/<Host>), e.g. made on a machine with network by
#            `git clone --mirror https://github.com/dvlab-research/LISA.git DIR/LISA.git`. The
#            script records it as the submodule URL (`git config submodule.<name>.url`, in the
#            superproject's .git/config) and runs
#            `git -c protocol.file.allow=always submodule update --init -- <Host>`.
#            The `-c` matters: since git 2.38.1 submodule clones refuse local/file:// URLs, and a
#            repo-local `git config protocol.file.allow always` is NOT read by the clone git runs
#            for the submodule; only `-c` (or the global/system setting) reaches it.
#            Without --mirror the same two steps can be run by hand:
#              git config submodule.<Host>.url /path/to/<Host>.git
#              git -c protocol.file.allow=always submodule update --init -- <Host>
#
# For each host the script:
#   1. runs `git submodule update --init <Host>` if the submodule is not checked out yet (from
#      the --mirror clone when given);
#   2. reads the pin (the gitlink the superproject records; the index is used, which equals
#      HEAD unless a new pin has been staged) and requires the submodule HEAD to be exactly the
#      pin: otherwise it refuses ("already patched") and lists the commits on top;
#   3. refuses if the submodule work tree is dirty (tracked changes or untracked files);
#   4. runs `git am --3way patches/<Host>/*.patch` (sorted by name, C locale). A committer
#      identity is supplied with -c user.name/-c user.email when none is configured, and
#      --committer-date-is-author-date is used so that, with the same identity, the resulting
#      commit ids are reproducible;
#   5. on failure runs `git am --abort` (the submodule is back at the pin) and exits non-zero.
#
# The repo root is taken from `git rev-parse --show-toplevel` of the directory holding this
# script, so the script can be run from any working directory.
#
# Exit codes: 0 success (or no patches), 1 error (dirty tree, `git am` failure, missing pin, ...),
# 2 usage error, 3 the submodule is already patched (HEAD != pin). With `all` the first
# non-zero code wins, except that a hard error (1) overrides an "already patched" (3).

set -euo pipefail

ALL_HOSTS=(LLaVA-NeXT LLaVA-3D Chat-Scene LISA)

# Pins recorded in the project's documentation; only used for a warning if the superproject's
# gitlink differs (the superproject is the source of truth).
declare -A DOC_PINS=(
    [LLaVA-NeXT]=e9835311c6f515a13702eb7a7750fcd936f65ed8
    [LLaVA-3D]=91d979dca9998174c8eda50744de8da448e0ba0c
    [Chat-Scene]=475e10698b405065bb2a56b70f74ae979c3207ee
    [LISA]=3cb2d4301f1af4691bd4f3938335ef06e76f155a
)

usage() {
    echo "usage: $0 [--check] [--mirror DIR] <Host>|all   (hosts: ${ALL_HOSTS[*]})" >&2
    exit 2
}

log() { echo "[apply_patches] $*"; }
err() { echo "[apply_patches] ERROR: $*" >&2; }

CHECK=0
TARGET=""
MIRROR=""
while [[ $# -gt 0 ]]; do
    arg="$1"
    shift
    case "$arg" in
        --check) CHECK=1 ;;
        --mirror)
            [[ $# -gt 0 && -n "$1" ]] || { err "--mirror: expected a directory, got nothing"; usage; }
            MIRROR="$1"; shift ;;
        --mirror=*)
            MIRROR="${arg#--mirror=}"
            [[ -n "$MIRROR" ]] || { err "--mirror: expected a directory, got nothing"; usage; } ;;
        -h|--help) usage ;;
        -*) err "unknown option: $arg"; usage ;;
        *)
            [[ -z "$TARGET" ]] || { err "only one host (or 'all') may be given"; usage; }
            TARGET="$arg" ;;
    esac
done
[[ -n "$TARGET" ]] || usage
if [[ -n "$MIRROR" ]]; then
    [[ -d "$MIRROR" ]] || { err "--mirror: expected an existing directory, got '$MIRROR'"; exit 2; }
    MIRROR="$(cd "$MIRROR" && pwd -P)"
fi

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel)"

# Print the pinned commit of submodule $1 (from the superproject index; warn if HEAD differs).
read_pin() {
    local host="$1" entry mode sha head_sha
    entry="$(git -C "$ROOT" ls-files --stage -- "$host")"
    if [[ -z "$entry" ]]; then
        err "'$host' is not recorded in the superproject index (no gitlink); add the submodule first"
        return 1
    fi
    mode="${entry%% *}"
    sha="$(echo "$entry" | awk '{print $2}')"
    if [[ "$mode" != "160000" ]]; then
        err "'$host' is recorded with mode $mode, not as a submodule gitlink (160000)"
        return 1
    fi
    if git -C "$ROOT" rev-parse -q --verify HEAD >/dev/null 2>&1; then
        head_sha="$(git -C "$ROOT" ls-tree HEAD -- "$host" | awk '{print $3}')"
        if [[ -n "$head_sha" && "$head_sha" != "$sha" ]]; then
            echo "[apply_patches] warning: $host pin in the index ($sha) differs from HEAD ($head_sha); using the index" >&2
        fi
    fi
    echo "$sha"
}

# Print the submodule name (the key in .gitmodules) whose path is $1; the path itself if none.
submodule_name() {
    local host="$1" key path
    if [[ -f "$ROOT/.gitmodules" ]]; then
        while read -r key path; do
            if [[ "$path" == "$host" ]]; then
                key="${key#submodule.}"
                echo "${key%.path}"
                return 0
            fi
        done < <(git config -f "$ROOT/.gitmodules" --get-regexp '^submodule\..*\.path$' || true)
    fi
    echo "$host"
}

# Clone submodule $1 from the local mirror under $MIRROR (see --mirror above).
init_from_mirror() {
    local host="$1" name src="" cand old
    for cand in "$MIRROR/$host.git" "$MIRROR/$host"; do
        # a bare repository, or a work tree with its own .git (not a folder inside another repo)
        if [[ -d "$cand" ]] && { [[ -e "$cand/.git" ]] ||
                [[ "$(git -C "$cand" rev-parse --is-bare-repository 2>/dev/null)" == true ]]; }; then
            src="$cand"
            break
        fi
    done
    if [[ -z "$src" ]]; then
        err "$host: --mirror: expected a git repository at $MIRROR/$host.git or $MIRROR/$host, found none"
        return 1
    fi
    name="$(submodule_name "$host")"
    old="$(git -C "$ROOT" config "submodule.$name.url" || true)"
    git -C "$ROOT" config "submodule.$name.url" "$src" || return 1
    log "$host: submodule.$name.url = $src (was: ${old:-unset}); cloning from the mirror"
    git -C "$ROOT" -c protocol.file.allow=always submodule update --init -- "$host"
}

# True when $1 is a checked-out git repository whose top level is $1 itself.
is_checked_out() {
    local dir="$1" top
    [[ -e "$dir/.git" ]] || return 1
    top="$(git -C "$dir" rev-parse --show-toplevel 2>/dev/null)" || return 1
    [[ "$(cd "$top" && pwd -P)" == "$(cd "$dir" && pwd -P)" ]]
}

process_host() {
    local host="$1"
    local dir="$ROOT/$host"
    local pin head
    pin="$(read_pin "$host")"
    if [[ -n "${DOC_PINS[$host]:-}" && "${DOC_PINS[$host]}" != "$pin" ]]; then
        echo "[apply_patches] warning: $host gitlink $pin differs from the documented pin ${DOC_PINS[$host]}" >&2
    fi

    if ! is_checked_out "$dir"; then
        if [[ -n "$MIRROR" ]]; then
            if ! init_from_mirror "$host"; then
                err "$host: initialising the submodule from the mirror failed (see git output above)"
                return 1
            fi
        else
            log "$host: initialising submodule"
            if ! git -C "$ROOT" submodule update --init -- "$host"; then
                local name
                name="$(submodule_name "$host")"
                err "$host: 'git submodule update --init' failed. Offline? Clone from a local mirror" \
                    "(a bare 'git clone --mirror' of the upstream): rerun with --mirror <dir holding $host.git>, or by hand:" \
                    "git config submodule.$name.url /path/to/$host.git && git -c protocol.file.allow=always submodule update --init -- $host" \
                    "(the -c is needed: a repo-local protocol.file.allow does not reach the submodule clone)"
                return 1
            fi
        fi
    elif [[ -n "$MIRROR" ]]; then
        log "$host: already checked out; --mirror not used"
    fi
    is_checked_out "$dir" || { err "$host: submodule is not checked out at $dir"; return 1; }

    if ! git -C "$dir" cat-file -e "${pin}^{commit}" 2>/dev/null; then
        err "$host: pinned commit $pin is not present in the submodule; run: git -C $host fetch origin $pin"
        return 1
    fi

    # Collect the series (sorted, C locale).
    local patches=() f
    if [[ -d "$ROOT/patches/$host" ]]; then
        while IFS= read -r f; do
            [[ -n "$f" ]] && patches+=("$f")
        done < <(find "$ROOT/patches/$host" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort)
    fi

    # Committer identity for git am when none is configured.
    local ident=()
    if [[ -z "$(git -C "$dir" config user.name || true)" || -z "$(git -C "$dir" config user.email || true)" ]]; then
        ident=(-c user.name="apply_patches" -c user.email="apply_patches@localhost")
    fi

    head="$(git -C "$dir" rev-parse HEAD)"

    if [[ "$CHECK" == 1 ]]; then
        if [[ "$head" != "$pin" ]]; then
            echo "[apply_patches] note: $host HEAD is $head, not the pin $pin (checking against the pin anyway)" >&2
        fi
        if [[ ${#patches[@]} -eq 0 ]]; then
            log "no patches for $host yet"
            return 0
        fi
        local tmp rc=0
        tmp="$(mktemp -d "${TMPDIR:-/tmp}/apply_patches_check.XXXXXX")"
        rmdir "$tmp"   # git worktree add wants to create it
        # shellcheck disable=SC2064
        trap "git -C '$dir' worktree remove --force '$tmp' >/dev/null 2>&1 || true; rm -rf '$tmp'; git -C '$dir' worktree prune >/dev/null 2>&1 || true" EXIT
        git -C "$dir" worktree add --quiet --detach "$tmp" "$pin"
        if git "${ident[@]}" -C "$tmp" am --3way --quiet --committer-date-is-author-date "${patches[@]}"; then
            log "$host: check OK: ${#patches[@]} patch(es) apply cleanly on $pin"
        else
            git "${ident[@]}" -C "$tmp" am --abort >/dev/null 2>&1 || true
            err "$host: the series does NOT apply on $pin (see git output above)"
            rc=1
        fi
        return "$rc"
    fi

    if [[ "$head" != "$pin" ]]; then
        err "$host is already patched or moved: HEAD $head is not the pinned commit $pin."
        if git -C "$dir" merge-base --is-ancestor "$pin" "$head" 2>/dev/null; then
            echo "Commits on top of the pin:" >&2
            git -C "$dir" log --oneline "$pin..$head" >&2
        else
            echo "HEAD does not descend from the pin." >&2
        fi
        echo "To start over (this discards those commits from HEAD): git -C $host checkout $pin" >&2
        return 3
    fi

    if [[ ${#patches[@]} -eq 0 ]]; then
        log "no patches for $host yet"
        return 0
    fi

    local dirty
    dirty="$(git -C "$dir" status --porcelain --untracked-files=normal)"
    if [[ -n "$dirty" ]]; then
        err "$host work tree is dirty; refusing to apply patches. Commit, stash or clean it first:"
        echo "$dirty" >&2
        return 1
    fi
    if [[ -d "$(git -C "$dir" rev-parse --git-path rebase-apply)" ]]; then
        err "$host has a git am/rebase in progress; run: git -C $host am --abort"
        return 1
    fi

    log "$host: applying ${#patches[@]} patch(es) on $pin"
    if ! git "${ident[@]}" -C "$dir" am --3way --committer-date-is-author-date "${patches[@]}"; then
        if ! git "${ident[@]}" -C "$dir" am --abort; then
            err "$host: git am failed AND 'git am --abort' failed; inspect $host manually (git -C $host am --abort)"
            return 1
        fi
        err "$host: git am failed; aborted, the submodule is back at $pin. Rebase the series on the pin and retry."
        return 1
    fi
    log "$host: now at $(git -C "$dir" rev-parse --short HEAD) = pin + ${#patches[@]} commit(s)"
}

if [[ "$TARGET" == "all" ]]; then
    HOSTS=("${ALL_HOSTS[@]}")
else
    HOSTS=("$TARGET")
fi

overall=0
for h in "${HOSTS[@]}"; do
    set +e
    ( set -e; process_host "$h" )
    rc=$?
    set -e
    if [[ $rc -ne 0 ]]; then
        if [[ $overall -eq 0 || $overall -eq 3 ]]; then
            overall=$rc
        fi
    fi
done
exit "$overall"
