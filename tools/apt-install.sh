#!/bin/sh
# `make sandbox`, `proxy` and `postgres`: apt-get install PACKAGE..., waiting for another apt-get.
#
# Two installs at once (another `make test`, unattended upgrades) used to make the second fail
# at once on apt's locks, and its tests skip. dpkg's lock is waited for with
# DPkg::Lock::Timeout (seconds); `apt-get update`'s lists lock is not (apt 2.6), so it is retried.
# Lists already on the machine are tried first: no update, no network, when they suffice.
set -u
install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends "$@" >/dev/null
}
install "$@" 2>/dev/null && exit 0
for attempt in 1 2 3 4 5 6; do
  apt-get -o DPkg::Lock::Timeout=300 update -qq && install "$@" && exit 0
  echo "apt-get: attempt $attempt to install $* failed; trying again in 10 s" >&2
  sleep 10
done
exit 1
