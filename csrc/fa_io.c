/*
 * fa_io.c: one send(2)/recv(2)/sendmsg(2) per call, errors as -errno.
 *
 * Why MSG_NOSIGNAL: writing to a stream socket whose peer has gone away
 * raises SIGPIPE, whose default action kills the process. CPython ignores
 * SIGPIPE at startup, but an embedding application, a user who restored
 * SIG_DFL (common in CLI tools: `signal(SIGPIPE, SIG_DFL)`), or a child that
 * inherited it does not; with MSG_NOSIGNAL the call just fails with EPIPE,
 * which asyncore maps to a disconnect. On macOS (and anywhere without
 * MSG_NOSIGNAL) we set the per-socket SO_NOSIGPIPE option before sending.
 *
 * Lengths are size_t and clamped to FA_MAX_IO so that the returned count
 * always fits ssize_t (and Linux never returns a short count we did not ask
 * for because of its own 0x7ffff000 clamp).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fastasyncore.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

/* Apple: recent SDKs define MSG_NOSIGNAL but older kernels reject unknown
 * flags, while SO_NOSIGPIPE has always worked there (libuv does the same). */
#if defined(__APPLE__) && defined(SO_NOSIGPIPE)
#define FA_USE_SO_NOSIGPIPE 1
#define FA_SEND_FLAGS 0
#elif defined(MSG_NOSIGNAL)
#define FA_SEND_FLAGS MSG_NOSIGNAL
#elif defined(SO_NOSIGPIPE)
#define FA_USE_SO_NOSIGPIPE 1
#define FA_SEND_FLAGS 0
#else
#define FA_SEND_FLAGS 0 /* no way to suppress SIGPIPE per call */
#endif

static void fa_nosigpipe(int fd)
{
#ifdef FA_USE_SO_NOSIGPIPE
    /* Idempotent; one extra syscall per send on these platforms. */
    int one = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
#else
    (void)fd;
#endif
}

ssize_t fa_send(int fd, const char *buf, size_t len)
{
    ssize_t n;
    if (fd < 0)
        return -EBADF;
    if (buf == NULL && len)
        return -EFAULT;
    if (len > FA_MAX_IO)
        len = FA_MAX_IO;
    fa_nosigpipe(fd);
    n = send(fd, buf, len, FA_SEND_FLAGS);
    return n < 0 ? -(ssize_t)errno : n;
}

ssize_t fa_recv(int fd, char *buf, size_t len)
{
    ssize_t n;
    if (fd < 0)
        return -EBADF;
    if (buf == NULL || len == 0)
        return -EINVAL;
    if (len > FA_MAX_IO)
        len = FA_MAX_IO;
    n = recv(fd, buf, len, 0);
    return n < 0 ? -(ssize_t)errno : n;
}

ssize_t fa_sendv(int fd, const char *const *bufs, const size_t *lens,
                 size_t nbufs, size_t max_bytes)
{
    struct iovec iov[FA_IOV_MAX];
    struct msghdr msg;
    size_t i, niov = 0, total = 0;
    ssize_t n;

    if (fd < 0)
        return -EBADF;
    if (nbufs && (bufs == NULL || lens == NULL))
        return -EFAULT;
    if (max_bytes > FA_MAX_IO)
        max_bytes = FA_MAX_IO;
    for (i = 0; i < nbufs && niov < FA_IOV_MAX && total < max_bytes; i++) {
        size_t l = lens[i];
        if (l == 0)
            continue;
        if (bufs[i] == NULL)
            return -EFAULT;
        if (l > max_bytes - total) /* no overflow: total < max_bytes */
            l = max_bytes - total;
        iov[niov].iov_base = (void *)bufs[i];
        iov[niov].iov_len = l;
        niov++;
        total += l;
    }
    if (niov == 0)
        return 0;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = niov; /* size_t on Linux, int elsewhere; <= FA_IOV_MAX */
    fa_nosigpipe(fd);
    n = sendmsg(fd, &msg, FA_SEND_FLAGS);
    return n < 0 ? -(ssize_t)errno : n;
}
