/*
 * fastasyncore C core: the whole C surface seen by build.py (cffi).
 *
 * Rules followed by every function here:
 *   - no callbacks into Python, no Python API at all: cffi calls these with the
 *     GIL released, so they only touch memory they own or that the caller keeps
 *     alive (cffi arguments, ffi.from_buffer exports) for the call's duration;
 *   - errors are returned as -errno (never errno as a side channel), so the
 *     caller does not need ffi.errno and cannot read a clobbered errno;
 *   - every length is a size_t, every fd and length is validated, every
 *     allocation is checked (-ENOMEM), and no fd is ever passed to FD_SET.
 *
 * Event bits are poll(2)'s (POLLIN=1 POLLPRI=2 POLLOUT=4 POLLERR=8 POLLHUP=16
 * POLLNVAL=32), which are also epoll's and the select module's values.
 */
#ifndef FASTASYNCORE_H
#define FASTASYNCORE_H

#include <stddef.h>
#include <sys/types.h>

#define FA_POLLIN   0x01
#define FA_POLLPRI  0x02
#define FA_POLLOUT  0x04
#define FA_POLLERR  0x08
#define FA_POLLHUP  0x10
#define FA_POLLNVAL 0x20
/* Not a poll(2) bit: the kernel refused this fd when we registered or changed
 * it, with the errno in the bits above FA_FAULT_SHIFT (EINVAL: the number is
 * the poller's own fd, ELOOP, ENOSPC: max_user_watches, ...).  Reported once;
 * the loop routes it to the channel as 3.11 routes an OSError from its socket
 * (handle_close() for the disconnect errnos, handle_error() otherwise).  The
 * fd then stays silent (not retried) until it is removed (events == 0). */
#define FA_POLLFAULT 0x8000
#define FA_FAULT_SHIFT 16

/* Poller kinds (FA_KIND_*); which ones exist is decided at compile time. */
#define FA_KIND_EPOLL  1
#define FA_KIND_KQUEUE 2
#define FA_KIND_POLL   3

/* Largest byte count passed to one send/recv/sendmsg (Linux clamps to
 * 0x7ffff000 anyway; this keeps every count representable in ssize_t/int). */
#define FA_MAX_IO ((size_t)1 << 30)
/* Largest number of iovecs in one fa_sendv (POSIX guarantees IOV_MAX >= 16,
 * Linux/BSD/macOS have 1024). */
#define FA_IOV_MAX 1024

/* ---- poller ---------------------------------------------------------- */
typedef struct fa_poller fa_poller;

/* Fill kinds[0..n) with the available kinds, best first; returns the count. */
int fa_poller_kinds(int *kinds, int n);
/* Create a poller of `kind`; 0 and *out set, or -errno (-EINVAL: unknown kind). */
int fa_poller_new(int kind, fa_poller **out);
void fa_poller_free(fa_poller *p);
/* The kernel object's fd (epoll/kqueue), -1 for poll. */
int fa_poller_fileno(const fa_poller *p);
/*
 * One call per loop iteration: apply `nchanges` (fd, events) pairs from
 * changes[0..2*nchanges) in order (events == 0 removes), then wait at most
 * timeout_ms (< 0: forever) and write up to `maxout` (fd, revents) pairs to
 * out[0..2*maxout). Returns the number of pairs, or -errno. *napplied is set to
 * the number of changes consumed (all of them unless an unexpected OS error
 * stopped the batch; the failing change is counted as consumed). -EINTR is
 * returned as is, never retried here: the caller (Python) must run its signal
 * handlers and retry with the remaining time.
 */
int fa_poller_wait(fa_poller *p, const int *changes, size_t nchanges,
                   int timeout_ms, int *out, size_t maxout, size_t *napplied);
/* Apply (fd, events) changes now, without waiting; 0 or -errno (as above). */
int fa_poller_apply(fa_poller *p, const int *changes, size_t nchanges,
                    size_t *napplied);

/*
 * A stateless poll(2): one call over the (fd, events) pairs in
 * fds[0..2*n) (what asyncore 3.11's poll2 does every iteration), writing up
 * to `maxout` (fd, revents) pairs of ready fds to out[0..2*maxout). Returns
 * the number of pairs, or -errno; -EINTR is returned as is (the caller runs
 * its signal handlers and retries with the remaining time). Negative fds are
 * ignored by the kernel, as poll(2) documents.
 */
int fa_poll_once(const int *fds, size_t n, int timeout_ms, int *out,
                 size_t maxout);

/* ---- plain fd I/O ------------------------------------------------------ */
/* One send(2)/recv(2)/sendmsg(2); bytes transferred or -errno. */
ssize_t fa_send(int fd, const char *buf, size_t len);
ssize_t fa_recv(int fd, char *buf, size_t len);
ssize_t fa_sendv(int fd, const char *const *bufs, const size_t *lens,
                 size_t nbufs, size_t max_bytes);

/* ---- send queue --------------------------------------------------------- */
typedef struct fa_sendq fa_sendq;

fa_sendq *fa_sendq_new(void);               /* NULL on ENOMEM */
void fa_sendq_free(fa_sendq *q);
size_t fa_sendq_len(const fa_sendq *q);
int fa_sendq_push(fa_sendq *q, const char *data, size_t len);  /* 0 or -ENOMEM */
/* Pointer to the first pending byte (valid until the next push/consume/clear). */
const char *fa_sendq_data(const fa_sendq *q);
size_t fa_sendq_consume(fa_sendq *q, size_t n);   /* returns bytes consumed */
void fa_sendq_clear(fa_sendq *q);
/* One send of up to max_bytes from the front; consumes what was sent. */
ssize_t fa_sendq_send(fa_sendq *q, int fd, size_t max_bytes);

/* ---- terminator scanning -------------------------------------------------- */
/* Write the absolute start indices of up to `limit` successive non-overlapping
 * occurrences of term in buf[start:] to out; returns the count (0 when tlen==0). */
size_t fa_scan(const char *buf, size_t buflen, size_t start,
               const char *term, size_t tlen, size_t *out, size_t limit);
/* asynchat.find_prefix_at_end: the length of the longest proper prefix of
 * needle that haystack ends with (-1 when nlen == 0, like the Python code). */
ptrdiff_t fa_prefix_at_end(const char *hay, size_t hlen,
                           const char *needle, size_t nlen);

#endif /* FASTASYNCORE_H */
