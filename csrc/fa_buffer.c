/*
 * fa_buffer.c: the send queue and the terminator scanner.
 *
 * Send queue. Operations: push (append a copy), send/consume from the front,
 * peek. Goals: O(1) amortised push, O(total) draining, one contiguous region
 * so a send is one send(2) with no iovec building, no use of caller memory
 * after push returns (asynchat users mutate bytearrays they pushed).
 * Plan: one heap block buf[0..cap) holding pending bytes in [head, tail).
 * consume() only moves head. push() appends at tail; when there is no room it
 * first slides the pending bytes down to 0 if the dead prefix is at least as
 * long as they are (the move is paid for by the consumed bytes), else at least
 * doubles the block, so push is O(1) amortised per byte. An empty queue resets head = tail = 0 for free.
 *
 * Scanner. asynchat looks for a terminator in the input buffer; the stdlib
 * slices the buffer after each hit, which is quadratic on a flood of
 * terminators. fa_scan walks one offset through the buffer and reports many
 * hits per call, so the caller can slice once.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fastasyncore.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct fa_sendq {
    char *buf;
    size_t head, tail, cap;
};

fa_sendq *fa_sendq_new(void)
{
    return (fa_sendq *)calloc(1, sizeof(fa_sendq));
}

void fa_sendq_free(fa_sendq *q)
{
    if (q == NULL)
        return;
    free(q->buf);
    free(q);
}

size_t fa_sendq_len(const fa_sendq *q)
{
    return q ? q->tail - q->head : 0;
}

int fa_sendq_push(fa_sendq *q, const char *data, size_t len)
{
    size_t used, need, ncap;
    if (q == NULL)
        return -EINVAL;
    if (len == 0)
        return 0;
    if (data == NULL)
        return -EFAULT;
    used = q->tail - q->head;
    if (len > SIZE_MAX - used)
        return -ENOMEM;
    need = used + len;
    if (len > q->cap - q->tail) {
        if (need <= q->cap && q->head >= used) {
            /* the dead prefix is at least as long as the live bytes: the
             * move costs no more than the bytes consumed since the last one */
            memmove(q->buf, q->buf + q->head, used);
        } else {
            char *nb;
            ncap = q->cap ? q->cap : 256;
            if (ncap > SIZE_MAX / 2)
                ncap = need;
            else if (q->cap)
                ncap *= 2;
            while (ncap < need) {
                if (ncap > SIZE_MAX / 2) {
                    ncap = need;
                    break;
                }
                ncap *= 2;
            }
            if (q->head == 0) {
                nb = (char *)realloc(q->buf, ncap);
                if (nb == NULL)
                    return -ENOMEM;
            } else {
                /* copy only the live bytes; no realloc of the dead prefix */
                nb = (char *)malloc(ncap);
                if (nb == NULL)
                    return -ENOMEM;
                memcpy(nb, q->buf + q->head, used);
                free(q->buf);
            }
            q->buf = nb;
            q->cap = ncap;
        }
        q->head = 0;
        q->tail = used;
    }
    memcpy(q->buf + q->tail, data, len);
    q->tail += len;
    return 0;
}

const char *fa_sendq_data(const fa_sendq *q)
{
    if (q == NULL || q->buf == NULL)
        return "";
    return q->buf + q->head;
}

size_t fa_sendq_consume(fa_sendq *q, size_t n)
{
    size_t used;
    if (q == NULL)
        return 0;
    used = q->tail - q->head;
    if (n > used)
        n = used;
    q->head += n;
    if (q->head == q->tail)
        q->head = q->tail = 0;
    return n;
}

void fa_sendq_clear(fa_sendq *q)
{
    if (q == NULL)
        return;
    q->head = q->tail = 0;
    /* Give back a large block: a burst must not pin its peak memory. */
    if (q->cap > 65536) {
        free(q->buf);
        q->buf = NULL;
        q->cap = 0;
    }
}

ssize_t fa_sendq_send(fa_sendq *q, int fd, size_t max_bytes)
{
    size_t used;
    ssize_t n;
    if (q == NULL)
        return -EINVAL;
    used = q->tail - q->head;
    if (used == 0 || max_bytes == 0)
        return 0;
    if (max_bytes > used)
        max_bytes = used;
    n = fa_send(fd, q->buf + q->head, max_bytes);
    if (n > 0)
        fa_sendq_consume(q, (size_t)n);
    return n;
}

size_t fa_scan(const char *buf, size_t buflen, size_t start,
               const char *term, size_t tlen, size_t *out, size_t limit)
{
    size_t count = 0, pos = start;
    if (buf == NULL || term == NULL || out == NULL || tlen == 0)
        return 0;
    while (count < limit && pos <= buflen && buflen - pos >= tlen) {
        const char *hit;
#if defined(__GLIBC__) || defined(__APPLE__) || defined(__FreeBSD__) || \
    defined(__NetBSD__) || defined(__OpenBSD__) || defined(__DragonFly__) || \
    defined(__linux__)
        hit = (const char *)memmem(buf + pos, buflen - pos, term, tlen);
#else
        {
            /* memchr for the first byte, then compare the rest */
            const char *p = buf + pos, *end = buf + buflen - tlen + 1;
            hit = NULL;
            while (p < end) {
                p = (const char *)memchr(p, term[0], (size_t)(end - p));
                if (p == NULL)
                    break;
                if (memcmp(p, term, tlen) == 0) {
                    hit = p;
                    break;
                }
                p++;
            }
        }
#endif
        if (hit == NULL)
            break;
        out[count++] = (size_t)(hit - buf);
        pos = (size_t)(hit - buf) + tlen;
    }
    return count;
}

ptrdiff_t fa_prefix_at_end(const char *hay, size_t hlen,
                           const char *needle, size_t nlen)
{
    size_t l;
    if (nlen == 0)
        return -1; /* what asynchat.find_prefix_at_end returns for b"" */
    if (hay == NULL || needle == NULL)
        return 0;
    for (l = nlen - 1; l > 0; l--)
        if (l <= hlen && memcmp(hay + hlen - l, needle, l) == 0)
            return (ptrdiff_t)l;
    return 0;
}
