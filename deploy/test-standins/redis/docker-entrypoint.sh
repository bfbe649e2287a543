#!/bin/sh
# What the official redis image's entrypoint does: options alone mean redis-server, the data dir belongs to
# redis, and the server runs as redis, not root. The official binary is built with protected mode off.
set -e
case "$1" in -*) set -- redis-server "$@" ;; esac
if [ "$1" = redis-server ]; then
    shift
    set -- redis-server --protected-mode no "$@"
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis '{}' +
        umask 0077
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
