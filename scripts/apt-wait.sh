# Sourced by scripts/setup: apt-get that waits for another apt or dpkg (unattended-upgrades,
# an admin) to release its locks, at most LOCK_WAIT seconds, instead of failing at once.
LOCK_WAIT=${VSSTORE_APT_LOCK_WAIT:-600}

apt_get() {
    # dpkg's locks: apt itself waits (and names the holder) with this option
    apt-get -o DPkg::Lock::Timeout="$LOCK_WAIT" "$@"
}

apt_update() {
    # the package lists' lock: retried here, every 5 s until LOCK_WAIT is over
    local end=$((SECONDS + LOCK_WAIT)) out
    while :; do
        out=$(apt_get update -qq 2>&1) && return 0
        if grep -q "Could not get lock" <<<"$out" && [ $SECONDS -lt $end ]; then
            echo "scripts/setup: another apt holds the package lists' lock; waiting (at most ${LOCK_WAIT}s in all)" >&2
            sleep 5
            continue
        fi
        echo "$out" >&2
        return 1
    done
}
