/*
 * fa_poller.c: a persistent, level-triggered readiness set over epoll (Linux),
 * kqueue (BSD/macOS) or poll(2) (everywhere else, and on request).
 *
 * One fa_poller_wait() call per loop iteration applies the caller's batched
 * interest changes and then waits, writing (fd, revents) pairs into an array
 * the caller preallocated. Nothing here calls back into Python.
 *
 * State kept here:
 *   tab[fd]  the interest the kernel currently holds for fd (0 = none), and
 *            for the poll kind the fd's index in pfds. The table only grows
 *            for fds the kernel accepted (i.e. open fds, bounded by
 *            RLIMIT_NOFILE), so a garbage fd such as 2**31-1 can never make
 *            us allocate gigabytes.
 *   ref[]    fds whose registration the kernel refused, reported the way
 *            poll(2) would report them (see "Emulating poll(2)" below).
 *
 * Some facts about epoll that shaped this file (after trio's _io_epoll.py):
 *
 *   - epoll registers (fd number, open file description) pairs, but it only
 *     drops a registration when the *file description* is closed, i.e. when
 *     the last fd referring to it is closed. If the fd is closed while a dup()
 *     of it (or a forked child's copy) is still open, the registration
 *     survives, keeps reporting events tagged with the old fd number, and can
 *     no longer be removed: EPOLL_CTL_DEL needs the fd number to refer to
 *     that same description, and it doesn't any more. This is the
 *     "fd/file-description aliasing trap". We cannot fix it from here; we
 *     mitigate it: events for fds we do not track are dropped instead of
 *     being reported, EPOLL_CTL_MOD failing with ENOENT (the kernel already
 *     dropped the registration because the fd was closed, maybe reused by a
 *     new socket) falls back to EPOLL_CTL_ADD, and EPOLL_CTL_ADD failing with
 *     EEXIST (the kernel still has a registration we had forgotten) falls back
 *     to EPOLL_CTL_MOD. Callers must remove an fd (modify(fd, 0)) *before*
 *     closing it, as asyncore's del_channel does.
 *   - epoll refuses regular files and some character devices with EPERM,
 *     while poll(2)/select(2) report them as always readable and writable.
 *   - a closed fd gives EBADF at registration, while poll(2) reports POLLNVAL
 *     for it at every call.
 *   - epoll_wait() fails with EINTR when a signal arrives, even with
 *     SA_RESTART. We return -EINTR instead of retrying: cffi runs this code
 *     without the GIL, Python's C-level signal handler only sets a flag, and
 *     the Python-level handler (which may raise KeyboardInterrupt) can only
 *     run once we are back in the interpreter. The Python wrapper retries with
 *     the remaining time (PEP 475).
 *   - EPOLL_CLOEXEC: the epoll fd must not leak into exec'd children.
 *   - we never use EPOLLET/EPOLLONESHOT: asyncore semantics are level-triggered.
 *
 * Emulating poll(2) for refused fds: EBADF -> POLLNVAL at every wait, EPERM
 * -> "always ready" for the POLLIN/POLLOUT part of the interest, until the fd
 * is modified or removed. While any such fd is reported the kernel wait uses a
 * zero timeout, exactly as poll(2) would return immediately.
 *
 * Any other per-fd refusal (EINVAL when the number is our own epoll/kqueue
 * fd -- a stale channel whose socket was closed before the poller was
 * created --, ELOOP, ENOSPC from max_user_watches, ...) must not fail the
 * wait of every other fd: poll(2) has no such errors, and asyncore programs
 * expect one bad channel to stay that channel's problem.  The fd is reported
 * once as FA_POLLFAULT with the errno (fastasyncore.h) and then kept silent,
 * not retried at each interest change (which would report it again and
 * again), until it is removed.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fastasyncore.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/epoll.h>
#define FA_HAVE_EPOLL 1
#endif
#if defined(FA_FORCE_KQUEUE) || defined(__APPLE__) || defined(__FreeBSD__) || \
    defined(__NetBSD__) || defined(__OpenBSD__) || defined(__DragonFly__)
#include <sys/types.h>
#include <sys/event.h>
#include <sys/time.h>
#define FA_HAVE_KQUEUE 1
#endif

#define FA_INTEREST (FA_POLLIN | FA_POLLPRI | FA_POLLOUT)
#define FA_REPORTED 0x3f /* IN PRI OUT ERR HUP NVAL; drops RDNORM & co. */

struct fa_fdent {
    int events; /* interest the kernel holds; 0 = not registered */
    int pos;    /* poll: index in pfds; kqueue: out index + 1 during a wait */
};

#define REF_READY 0    /* EPERM: always ready (the POLLIN/POLLOUT interest) */
#define REF_NVAL 1     /* EBADF: POLLNVAL at every wait */
#define REF_FAULT 2    /* other errno: FA_POLLFAULT at the next wait, then */
#define REF_SILENT 3   /* ... nothing until removed */

struct fa_refused {
    int fd;
    int events;
    int mode; /* REF_* */
    int err;  /* REF_FAULT: the errno */
};

struct fa_poller {
    int kind;
    int kfd; /* epoll/kqueue fd; -1 for poll */
    struct fa_fdent *tab;
    size_t tabcap;
    struct fa_refused *ref;
    size_t nref, refcap;
    struct pollfd *pfds; /* poll kind only */
    size_t npfds, pfdcap;
    void *evbuf; /* struct epoll_event[] / struct kevent[] */
    size_t evcap;
    size_t sweep_pos; /* next tab slot the idle sweep looks at */
};

/* ---- small checked-allocation helpers ------------------------------------- */

/* Grow *arr (elements of `size` bytes, capacity *cap) to hold at least `need`. */
static int grow(void **arr, size_t *cap, size_t need, size_t size)
{
    size_t ncap;
    void *n;
    if (need <= *cap)
        return 0;
    ncap = *cap ? *cap : 16;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2)
            return -ENOMEM;
        ncap *= 2;
    }
    if (ncap > SIZE_MAX / size)
        return -ENOMEM;
    n = realloc(*arr, ncap * size);
    if (n == NULL)
        return -ENOMEM;
    *arr = n;
    *cap = ncap;
    return 0;
}

static int tab_reserve(fa_poller *p, int fd)
{
    size_t old = p->tabcap;
    int rc;
    if ((size_t)fd < p->tabcap)
        return 0;
    rc = grow((void **)&p->tab, &p->tabcap, (size_t)fd + 1, sizeof(*p->tab));
    if (rc < 0)
        return rc;
    memset(p->tab + old, 0, (p->tabcap - old) * sizeof(*p->tab));
    return 0;
}

static int tab_events(const fa_poller *p, int fd)
{
    return (size_t)fd < p->tabcap ? p->tab[fd].events : 0;
}

static ptrdiff_t ref_find(const fa_poller *p, int fd)
{
    size_t i;
    for (i = 0; i < p->nref; i++)
        if (p->ref[i].fd == fd)
            return (ptrdiff_t)i;
    return -1;
}

static void ref_remove(fa_poller *p, size_t i)
{
    p->ref[i] = p->ref[--p->nref];
}

static int ref_add_err(fa_poller *p, int fd, int events, int mode, int err)
{
    int rc = grow((void **)&p->ref, &p->refcap, p->nref + 1, sizeof(*p->ref));
    if (rc < 0)
        return rc;
    p->ref[p->nref].fd = fd;
    p->ref[p->nref].events = events;
    p->ref[p->nref].mode = mode;
    p->ref[p->nref].err = err;
    p->nref++;
    return 0;
}

static int ref_add(fa_poller *p, int fd, int events, int nval)
{
    return ref_add_err(p, fd, events, nval ? REF_NVAL : REF_READY, 0);
}

/* The kernel refused fd with err: report it once (see the file comment).
 * ENOMEM is ours, not the fd's: it fails the call. */
static int ref_fault(fa_poller *p, int fd, int events, int err)
{
    if (err == ENOMEM || err <= 0)
        return -(err > 0 ? err : EIO);
    return ref_add_err(p, fd, events, REF_FAULT, err);
}

/* Report refused fds as poll(2) would, faults once; returns the number of
 * pairs written. */
static size_t report_refused(fa_poller *p, int *out, size_t maxout)
{
    size_t i, nout = 0;
    for (i = 0; i < p->nref && nout < maxout; i++) {
        int rev;
        switch (p->ref[i].mode) {
        case REF_NVAL:
            rev = FA_POLLNVAL;
            break;
        case REF_READY:
            rev = p->ref[i].events & (FA_POLLIN | FA_POLLOUT);
            break;
        case REF_FAULT:
            rev = FA_POLLFAULT | (p->ref[i].err << FA_FAULT_SHIFT);
            p->ref[i].mode = REF_SILENT;
            break;
        default:
            rev = 0;
        }
        if (rev) {
            out[2 * nout] = p->ref[i].fd;
            out[2 * nout + 1] = rev;
            nout++;
        }
    }
    return nout;
}

/*
 * Closed behind our back. epoll and kqueue silently forget an fd when it is
 * closed (its last reference, for epoll) without being removed first, while
 * poll(2) reports POLLNVAL for it at every call and asyncore relies on that to
 * call handle_close(). A kernel object cannot tell us, so we look: after a
 * wait that blocked and found nothing (the loop is idle, so the syscalls cost
 * nothing that matters), check a bounded number of registered fds, round
 * robin, with fcntl(F_GETFD); EBADF moves the fd to the refused list, which
 * reports POLLNVAL from the next wait on. Limits: a busy loop never sweeps,
 * and an fd number already reused by another open file is not detected.
 */
#define FA_SWEEP_CHECKS 64
#define FA_SWEEP_SLOTS 4096

static void sweep_closed(fa_poller *p)
{
    size_t slots = 0, checks = 0, fd;
    while (slots < FA_SWEEP_SLOTS && slots < p->tabcap && checks < FA_SWEEP_CHECKS) {
        if (p->sweep_pos >= p->tabcap)
            p->sweep_pos = 0;
        fd = p->sweep_pos++;
        slots++;
        if (p->tab[fd].events == 0)
            continue;
        checks++;
        if (fcntl((int)fd, F_GETFD) < 0 && errno == EBADF) {
            int ev = p->tab[fd].events;
            if (ref_add(p, (int)fd, ev, 1) == 0) /* ENOMEM: next sweep */
                p->tab[fd].events = 0;
        }
    }
}

/* ---- epoll ---------------------------------------------------------------- */
#ifdef FA_HAVE_EPOLL
/* EPOLLIN/PRI/OUT/ERR/HUP have poll(2)'s values on Linux, so no translation.
 * (glibc defines them as enum constants, hence a typedef, not #if.) */
typedef char fa_epoll_bits_are_poll_bits
    [(EPOLLIN == FA_POLLIN && EPOLLPRI == FA_POLLPRI && EPOLLOUT == FA_POLLOUT &&
      EPOLLERR == FA_POLLERR && EPOLLHUP == FA_POLLHUP) ? 1 : -1];

static int epoll_change(fa_poller *p, int fd, int ev)
{
    struct epoll_event e;
    int cur = tab_events(p, fd), err, rc;

    if (ev == 0) {
        if (cur) {
            p->tab[fd].events = 0;
            /* ENOENT/EBADF: the fd was closed, which already removed it (or,
             * with a dup alive, made it unremovable: see the file comment). */
            if (epoll_ctl(p->kfd, EPOLL_CTL_DEL, fd, NULL) < 0 &&
                errno != ENOENT && errno != EBADF)
                return -errno;
        }
        return 0;
    }
    memset(&e, 0, sizeof(e));
    e.events = (uint32_t)ev;
    e.data.fd = fd;
    if (cur) {
        if (epoll_ctl(p->kfd, EPOLL_CTL_MOD, fd, &e) == 0) {
            p->tab[fd].events = ev;
            return 0;
        }
        err = errno;
        p->tab[fd].events = 0;
        if (err == EBADF)
            return ref_add(p, fd, ev, 1);
        if (err != ENOENT) /* ENOENT: closed (and maybe reused): add afresh */
            return ref_fault(p, fd, ev, err);
    }
    if (epoll_ctl(p->kfd, EPOLL_CTL_ADD, fd, &e) < 0) {
        err = errno;
        if (err == EEXIST && epoll_ctl(p->kfd, EPOLL_CTL_MOD, fd, &e) == 0)
            goto added;
        if (err == EPERM) /* regular file etc.: poll says "always ready" */
            return ref_add(p, fd, ev, 0);
        if (err == EBADF)
            return ref_add(p, fd, ev, 1);
        return ref_fault(p, fd, ev, err); /* EINVAL (our own fd), ELOOP, ENOSPC */
    }
added:
    rc = tab_reserve(p, fd);
    if (rc < 0) {
        epoll_ctl(p->kfd, EPOLL_CTL_DEL, fd, NULL);
        return rc;
    }
    p->tab[fd].events = ev;
    return 0;
}

static int epoll_do_wait(fa_poller *p, int timeout_ms, int *out, size_t maxout)
{
    struct epoll_event *evs;
    size_t nout = report_refused(p, out, maxout), room = maxout - nout, i;
    int n;

    if (nout)
        timeout_ms = 0; /* poll(2) would not block either */
    if (room == 0)
        return (int)nout;
    if (room > (size_t)INT_MAX)
        room = (size_t)INT_MAX;
    if (room > p->evcap &&
        grow(&p->evbuf, &p->evcap, room, sizeof(struct epoll_event)) < 0 &&
        p->evcap == 0)
        return nout ? (int)nout : -ENOMEM;
    if (room > p->evcap)
        room = p->evcap; /* growth failed: use what we have */
    evs = (struct epoll_event *)p->evbuf;
    n = epoll_wait(p->kfd, evs, (int)room, timeout_ms);
    if (n < 0)
        return nout ? (int)nout : -errno;
    if (n == 0 && timeout_ms != 0)
        sweep_closed(p);
    for (i = 0; i < (size_t)n; i++) {
        int fd = evs[i].data.fd;
        /* An fd we do not track: a stale registration (aliasing trap). */
        if (fd < 0 || tab_events(p, fd) == 0)
            continue;
        out[2 * nout] = fd;
        out[2 * nout + 1] = (int)(evs[i].events & FA_REPORTED);
        nout++;
    }
    return (int)nout;
}
#endif /* FA_HAVE_EPOLL */

/* ---- kqueue ---------------------------------------------------------------- */
#ifdef FA_HAVE_KQUEUE
/*
 * kqueue has one filter per direction. A change for one fd becomes up to two
 * kevent changes, applied at once; errors come back per change. kqueue drops
 * an fd's knotes when the fd is closed (unlike epoll, per fd number), so
 * EV_DELETE failing with ENOENT/EBADF is expected after a close.
 * Regular files: EVFILT_READ works on them, but some systems refuse
 * EVFILT_WRITE on vnodes (EINVAL); such fds are reported "always ready" like
 * poll(2) does.
 */
static int kq_change(fa_poller *p, int fd, int ev)
{
    struct kevent ch[2], res[2];
    struct timespec zero = {0, 0};
    int cur = tab_events(p, fd), n = 0, r, i, err = 0, rc;
#ifdef EV_RECEIPT
    const unsigned short rcpt = EV_RECEIPT;
#else
    const unsigned short rcpt = 0;
#endif
    int addr = (ev & FA_POLLIN) && !(cur & FA_POLLIN);
    int delr = !(ev & FA_POLLIN) && (cur & FA_POLLIN);
    int addw = (ev & FA_POLLOUT) && !(cur & FA_POLLOUT);
    int delw = !(ev & FA_POLLOUT) && (cur & FA_POLLOUT);

    if (addr || delr)
        EV_SET(&ch[n++], (uintptr_t)fd, EVFILT_READ,
               (addr ? EV_ADD : EV_DELETE) | rcpt, 0, 0, 0);
    if (addw || delw)
        EV_SET(&ch[n++], (uintptr_t)fd, EVFILT_WRITE,
               (addw ? EV_ADD : EV_DELETE) | rcpt, 0, 0, 0);
    if (n) {
        do {
            r = kevent(p->kfd, ch, n, res, n, &zero);
        } while (r < 0 && errno == EINTR); /* applying changes, not waiting */
        if (r < 0) {
            err = errno;
        } else {
            for (i = 0; i < r; i++) {
                int e;
                if (!(res[i].flags & EV_ERROR) || res[i].data == 0)
                    continue;
                e = (int)res[i].data;
                if ((res[i].flags & EV_DELETE) && (e == ENOENT || e == EBADF))
                    continue;
                if (!err)
                    err = e;
            }
        }
    }
    if (err) {
        /* Leave nothing half-registered. */
        struct kevent dl[2];
        EV_SET(&dl[0], (uintptr_t)fd, EVFILT_READ, EV_DELETE, 0, 0, 0);
        EV_SET(&dl[1], (uintptr_t)fd, EVFILT_WRITE, EV_DELETE, 0, 0, 0);
        kevent(p->kfd, dl, 1, NULL, 0, &zero);
        kevent(p->kfd, dl + 1, 1, NULL, 0, &zero);
        if ((size_t)fd < p->tabcap)
            p->tab[fd].events = 0;
        if (ev == 0)
            return 0;
        if (err == EBADF)
            return ref_add(p, fd, ev, 1);
        if (err == EPERM || err == EINVAL || err == ENODEV)
            return ref_add(p, fd, ev, 0);
        return ref_fault(p, fd, ev, err);
    }
    if (ev == 0) {
        if ((size_t)fd < p->tabcap)
            p->tab[fd].events = 0;
        return 0;
    }
    rc = tab_reserve(p, fd);
    if (rc < 0) {
        struct kevent dl[2];
        EV_SET(&dl[0], (uintptr_t)fd, EVFILT_READ, EV_DELETE, 0, 0, 0);
        EV_SET(&dl[1], (uintptr_t)fd, EVFILT_WRITE, EV_DELETE, 0, 0, 0);
        kevent(p->kfd, dl, 1, NULL, 0, &zero);
        kevent(p->kfd, dl + 1, 1, NULL, 0, &zero);
        return rc;
    }
    p->tab[fd].events = ev;
    return 0;
}

static int kq_do_wait(fa_poller *p, int timeout_ms, int *out, size_t maxout)
{
    struct kevent *evs;
    struct timespec ts, *tsp = NULL;
    size_t nout = report_refused(p, out, maxout), room = maxout - nout;
    int n, i;

    if (nout)
        timeout_ms = 0;
    if (room == 0)
        return (int)nout;
    if (room > (size_t)INT_MAX)
        room = (size_t)INT_MAX;
    if (room > p->evcap &&
        grow(&p->evbuf, &p->evcap, room, sizeof(struct kevent)) < 0 &&
        p->evcap == 0)
        return nout ? (int)nout : -ENOMEM;
    if (room > p->evcap)
        room = p->evcap;
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tsp = &ts;
    }
    evs = (struct kevent *)p->evbuf;
    n = kevent(p->kfd, NULL, 0, evs, (int)room, tsp);
    if (n < 0)
        return nout ? (int)nout : -errno;
    if (n == 0 && timeout_ms != 0)
        sweep_closed(p);
    for (i = 0; i < n; i++) {
        int fd = (int)evs[i].ident, bits, pos;
        if (evs[i].filter == EVFILT_READ)
            bits = FA_POLLIN;
        else if (evs[i].filter == EVFILT_WRITE)
            bits = FA_POLLOUT;
        else
            continue;
        if (evs[i].flags & EV_ERROR)
            bits |= FA_POLLERR;
        if (fd < 0 || tab_events(p, fd) == 0)
            continue;
        /* Merge the read and write filters of one fd into one pair: tab.pos
         * remembers the pair's index (+1); it is only trusted when that slot
         * of this call's output really holds fd. */
        pos = p->tab[fd].pos;
        if (pos > 0 && (size_t)pos <= nout && out[2 * (pos - 1)] == fd) {
            out[2 * (pos - 1) + 1] |= bits;
            continue;
        }
        out[2 * nout] = fd;
        out[2 * nout + 1] = bits;
        nout++;
        p->tab[fd].pos = (int)nout;
    }
    return (int)nout;
}
#endif /* FA_HAVE_KQUEUE */

/* ---- poll(2) ------------------------------------------------------------------ */
/*
 * poll(2) itself reports POLLNVAL for closed fds and "always ready" for
 * regular files, so no emulation is needed, except that our table must not
 * grow for a garbage fd: a new fd is checked with fcntl(F_GETFD) first and an
 * invalid one goes to the refused list (reported as POLLNVAL, as poll would).
 */
static int poll_change(fa_poller *p, int fd, int ev)
{
    int cur = tab_events(p, fd), rc;
    if (ev == 0) {
        if (cur) {
            size_t pos = (size_t)p->tab[fd].pos, last = p->npfds - 1;
            if (pos != last) {
                p->pfds[pos] = p->pfds[last];
                p->tab[p->pfds[pos].fd].pos = (int)pos;
            }
            p->npfds--;
            p->tab[fd].events = 0;
        }
        return 0;
    }
    if (cur) {
        p->pfds[p->tab[fd].pos].events = (short)ev;
        p->tab[fd].events = ev;
        return 0;
    }
    if (fcntl(fd, F_GETFD) < 0 && errno == EBADF)
        return ref_add(p, fd, ev, 1);
    if (p->npfds >= (size_t)INT_MAX)
        return -ENOMEM;
    rc = tab_reserve(p, fd);
    if (rc < 0)
        return rc;
    rc = grow((void **)&p->pfds, &p->pfdcap, p->npfds + 1, sizeof(*p->pfds));
    if (rc < 0)
        return rc;
    p->pfds[p->npfds].fd = fd;
    p->pfds[p->npfds].events = (short)ev;
    p->pfds[p->npfds].revents = 0;
    p->tab[fd].events = ev;
    p->tab[fd].pos = (int)p->npfds;
    p->npfds++;
    return 0;
}

static int poll_do_wait(fa_poller *p, int timeout_ms, int *out, size_t maxout)
{
    size_t nout = report_refused(p, out, maxout), i;
    int n;
    if (nout)
        timeout_ms = 0;
    n = poll(p->pfds, (nfds_t)p->npfds, timeout_ms);
    if (n < 0)
        return nout ? (int)nout : -errno;
    for (i = 0; i < p->npfds && n > 0 && nout < maxout; i++) {
        if (p->pfds[i].revents) {
            n--;
            out[2 * nout] = p->pfds[i].fd;
            out[2 * nout + 1] = p->pfds[i].revents & FA_REPORTED;
            nout++;
        }
    }
    return (int)nout;
}

/* ---- public entry points -------------------------------------------------------- */

int fa_poller_kinds(int *kinds, int n)
{
    int c = 0;
    if (kinds == NULL || n <= 0)
        return 0;
#ifdef FA_HAVE_EPOLL
    if (c < n)
        kinds[c++] = FA_KIND_EPOLL;
#endif
#ifdef FA_HAVE_KQUEUE
    if (c < n)
        kinds[c++] = FA_KIND_KQUEUE;
#endif
    if (c < n)
        kinds[c++] = FA_KIND_POLL;
    return c;
}

int fa_poller_new(int kind, fa_poller **out)
{
    fa_poller *p;
    if (out == NULL)
        return -EINVAL;
    *out = NULL;
    p = (fa_poller *)calloc(1, sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    p->kind = kind;
    p->kfd = -1;
    switch (kind) {
#ifdef FA_HAVE_EPOLL
    case FA_KIND_EPOLL:
        p->kfd = epoll_create1(EPOLL_CLOEXEC);
        break;
#endif
#ifdef FA_HAVE_KQUEUE
    case FA_KIND_KQUEUE:
        /* kqueue fds are not inherited by fork() children at all; CLOEXEC
         * still matters for exec() without fork (posix_spawn is fine). */
        p->kfd = kqueue();
        if (p->kfd >= 0 && fcntl(p->kfd, F_SETFD, FD_CLOEXEC) < 0) {
            int err = errno;
            close(p->kfd);
            free(p);
            return -err;
        }
        break;
#endif
    case FA_KIND_POLL:
        *out = p;
        return 0;
    default:
        free(p);
        return -EINVAL;
    }
    if (p->kfd < 0) {
        int err = errno;
        free(p);
        return -err;
    }
    *out = p;
    return 0;
}

void fa_poller_free(fa_poller *p)
{
    if (p == NULL)
        return;
    if (p->kfd >= 0)
        close(p->kfd);
    free(p->tab);
    free(p->ref);
    free(p->pfds);
    free(p->evbuf);
    free(p);
}

int fa_poller_fileno(const fa_poller *p)
{
    return p ? p->kfd : -1;
}

static int apply_change(fa_poller *p, int fd, int ev)
{
    ptrdiff_t ri;
    if (fd < 0)
        return 0; /* the Python layer rejects these; never index with them */
    ev &= FA_INTEREST;
    ri = ref_find(p, fd);
    if (ri >= 0) {
        int mode = p->ref[ri].mode;
        if (ev && (mode == REF_FAULT || mode == REF_SILENT)) {
            /* a refused fd is not retried at each interest change (it would
             * be reported again and again): only removal clears it */
            p->ref[ri].events = ev;
            return 0;
        }
        ref_remove(p, (size_t)ri);
    }
    if (ev && fd == p->kfd) {
        /* Our own epoll/kqueue fd under a map key: a stale channel whose
         * socket was closed before this poller took the number.  epoll says
         * EINVAL itself; kqueue might accept it, or say EINVAL, which its
         * "always ready" rule (vnodes) would turn into a spin. */
        return ref_fault(p, fd, ev, EINVAL);
    }
    switch (p->kind) {
#ifdef FA_HAVE_EPOLL
    case FA_KIND_EPOLL:
        return epoll_change(p, fd, ev);
#endif
#ifdef FA_HAVE_KQUEUE
    case FA_KIND_KQUEUE:
        return kq_change(p, fd, ev);
#endif
    default:
        return poll_change(p, fd, ev);
    }
}

int fa_poller_apply(fa_poller *p, const int *changes, size_t nchanges,
                    size_t *napplied)
{
    /* Apply changes now, without waiting.  The loop removes an fd this way
     * *before* its socket is closed: epoll registrations belong to the open
     * file description, so an fd whose description outlives the close (a dup,
     * a fork, file_dispatcher's os.dup) would otherwise stay registered under
     * a number that the next socket may reuse, and feed it stale events. */
    size_t i;
    if (napplied)
        *napplied = 0;
    if (p == NULL || (nchanges && changes == NULL))
        return -EINVAL;
    for (i = 0; i < nchanges; i++) {
        int rc = apply_change(p, changes[2 * i], changes[2 * i + 1]);
        if (rc < 0) {
            if (napplied)
                *napplied = i + 1;
            return rc;
        }
    }
    if (napplied)
        *napplied = nchanges;
    return 0;
}

int fa_poller_wait(fa_poller *p, const int *changes, size_t nchanges,
                   int timeout_ms, int *out, size_t maxout, size_t *napplied)
{
    size_t i;
    if (napplied)
        *napplied = 0;
    if (p == NULL || (nchanges && changes == NULL) || (maxout && out == NULL))
        return -EINVAL;
    if (maxout > (size_t)INT_MAX)
        maxout = (size_t)INT_MAX; /* the count is returned as an int */
    for (i = 0; i < nchanges; i++) {
        int rc = apply_change(p, changes[2 * i], changes[2 * i + 1]);
        if (rc < 0) {
            if (napplied)
                *napplied = i + 1;
            return rc;
        }
    }
    if (napplied)
        *napplied = nchanges;
    if (timeout_ms < 0)
        timeout_ms = -1;
    switch (p->kind) {
#ifdef FA_HAVE_EPOLL
    case FA_KIND_EPOLL:
        return epoll_do_wait(p, timeout_ms, out, maxout);
#endif
#ifdef FA_HAVE_KQUEUE
    case FA_KIND_KQUEUE:
        return kq_do_wait(p, timeout_ms, out, maxout);
#endif
    default:
        return poll_do_wait(p, timeout_ms, out, maxout);
    }
}

/* ---- the stateless poll ------------------------------------------------ */

/* Used by the C loop (fa_cloop.c, through a function pointer) when a busy
 * map changes most interests every iteration: then one poll(2) over the
 * whole interest set beats one epoll_ctl() per change (_loop.adapt()).
 * Small sets use a stack array: no allocation per iteration. */
int fa_poll_once(const int *fds, size_t n, int timeout_ms, int *out,
                 size_t maxout)
{
    struct pollfd local[64], *pf = local;
    size_t i, k = 0;
    int r;

    if (n > (size_t)INT_MAX || (n && (fds == NULL || (maxout && out == NULL))))
        return -EINVAL;
    if (n > sizeof(local) / sizeof(local[0])) {
        pf = malloc(n * sizeof(*pf));
        if (pf == NULL)
            return -ENOMEM;
    }
    for (i = 0; i < n; i++) {
        pf[i].fd = fds[2 * i];
        pf[i].events = (short)(fds[2 * i + 1] & (POLLIN | POLLPRI | POLLOUT));
        pf[i].revents = 0;
    }
    r = poll(pf, (nfds_t)n, timeout_ms < 0 ? -1 : timeout_ms);
    if (r < 0) {
        r = -errno;
    } else {
        for (i = 0; i < n && k < maxout; i++) {
            if (pf[i].revents) {
                out[2 * k] = pf[i].fd;
                out[2 * k + 1] = pf[i].revents;
                k++;
            }
        }
        r = (int)k;
    }
    if (pf != local)
        free(pf);
    return r;
}
