/* fabench.c -- load generator and reference servers for fastasyncore's
 * benchmarks (see fastasyncore/_bench).  Linux only (epoll); loopback only.
 *
 *   fabench server  --mode echo|discard|http [--max-seconds S]
 *       listens on 127.0.0.1:<free port>, prints "PORT <n>" and serves until
 *       stdin reaches EOF, SIGTERM, or the deadline.
 *   fabench client  --port P --conns N --mode pingpong|echo|oneway
 *                   [--size S] [--reply R] [--fill C] [--idle I]
 *                   [--warmup W] [--duration D] [--max-requests M]
 *                   [--setup-timeout T] [--pid SERVERPID] [--cpus A,B]
 *       connects I idle connections, then N active ones; warms up for W s,
 *       then measures for D s (or until M requests), reading the server's
 *       utime+stime from /proc/PID/stat, and prints one JSON line.
 *   fabench httpclient --port P --conns N --rounds K [--setup-timeout T]
 *       the W4 floor: N concurrent connections x K HTTP/1.0-like requests.
 *
 * Every mode is bounded in time and stops by itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536
#define MAXEV 512

static const char HTTP_REQ[] = "GET /index.html HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: fabench\r\n\r\n";
static const char HTTP_RESP[] = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!";

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    printf("{\"ok\": false, \"error\": \"%s: %s\"}\n", what, strerror(errno));
    fflush(stdout);
    exit(2);
}

static void fail(const char *what) {
    printf("{\"ok\": false, \"error\": \"%s\"}\n", what);
    fflush(stdout);
    exit(2);
}

static void nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* ---- /proc ------------------------------------------------------------ */
/* utime + stime of pid, in ticks; *sys (if not NULL) gets the stime part.
 * Linux divides the process's exact run time between the two by where its
 * timer ticks fell, so over a one-second window the split is a sample. */
static long long proc_ticks(int pid, long long *sys) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    p += 2;                                   /* field 3: state */
    for (int field = 3; field < 14; field++) {
        p = strchr(p, ' ');
        if (!p) return -1;
        p++;
    }
    long long ut = 0, st = 0;
    if (sscanf(p, "%lld %lld", &ut, &st) != 2) return -1;
    if (sys) *sys = st;
    return ut + st;
}

/* busy ticks of one CPU from /proc/stat: user+nice+system+steal (irq/softirq
 * excluded, so that network processing accounted there is not counted as
 * "other load"). */
static long long cpu_busy(int cpu) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1;
    char line[512], want[32];
    snprintf(want, sizeof want, "cpu%d ", cpu);
    long long res = -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, want, strlen(want)) == 0) {
            long long v[10] = {0};
            sscanf(line + strlen(want), "%lld %lld %lld %lld %lld %lld %lld %lld",
                   &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
            res = v[0] + v[1] + v[2] + v[7];
            break;
        }
    }
    fclose(f);
    return res;
}

static double loadavg1(void) {
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) { if (fscanf(f, "%lf", &l) != 1) l = -1; fclose(f); }
    return l;
}

static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 +
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

/* ---- arguments --------------------------------------------------------- */
static int argc_g; static char **argv_g;
static const char *opt(const char *name, const char *dflt) {
    for (int i = 2; i < argc_g - 1; i++)
        if (strcmp(argv_g[i], name) == 0) return argv_g[i + 1];
    return dflt;
}
static double optf(const char *name, double d) {
    const char *s = opt(name, NULL);
    return s ? atof(s) : d;
}

static int connect_nb(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    nonblock(fd);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS)
        die("connect");
    return fd;
}

/* ======================================================================== */
/* server                                                                   */
/* ======================================================================== */
typedef struct { char *buf; size_t len, off, cap; int http_state; } sconn;

static volatile sig_atomic_t stop_flag = 0;
static void on_term(int sig) { (void)sig; stop_flag = 1; }

static int server_main(void) {
    const char *mode = opt("--mode", "echo");
    int m = strcmp(mode, "echo") == 0 ? 0 : strcmp(mode, "discard") == 0 ? 1 :
            strcmp(mode, "http") == 0 ? 2 : -1;
    if (m < 0) fail("unknown server mode");
    double deadline = now() + optf("--max-seconds", 300);
    raise_nofile();
    signal(SIGTERM, on_term);
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    socklen_t al = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &al);
    nonblock(ls);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    ev.data.fd = 0;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);     /* stdin: EOF means stop */
    printf("PORT %d\n", ntohs(a.sin_port));
    fflush(stdout);

    size_t ncap = 65536;
    sconn *conns = calloc(ncap, sizeof *conns);
    static char rbuf[CHUNK];
    struct epoll_event evs[MAXEV];
    while (!stop_flag && now() < deadline) {
        int n = epoll_wait(ep, evs, MAXEV, 100);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == 0) {
                ssize_t r = read(0, rbuf, sizeof rbuf);
                if (r <= 0) stop_flag = 1;
                continue;
            }
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if ((size_t)c >= ncap) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    memset(&conns[c], 0, sizeof conns[c]);
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            sconn *s = &conns[fd];
            int closed = 0;
            for (;;) {
                /* flush pending output first */
                while (s->off < s->len) {
                    ssize_t w = send(fd, s->buf + s->off, s->len - s->off, MSG_NOSIGNAL);
                    if (w < 0) { if (errno != EAGAIN) closed = 1; break; }
                    s->off += w;
                }
                if (closed) break;
                if (s->off == s->len) s->off = s->len = 0;
                if (s->len > (1 << 20)) break;        /* backpressure: stop reading */
                ssize_t r = recv(fd, rbuf, sizeof rbuf, 0);
                if (r == 0) { closed = 1; break; }
                if (r < 0) { if (errno != EAGAIN) closed = 1; break; }
                const char *out = rbuf; size_t olen = 0;
                if (m == 0) olen = r;
                else if (m == 2) {
                    /* count request ends "\r\n\r\n" across reads */
                    for (ssize_t k = 0; k < r; k++) {
                        char ch = rbuf[k];
                        int st = s->http_state;
                        if ((st == 0 || st == 2) && ch == '\r') st++;
                        else if ((st == 1 || st == 3) && ch == '\n') st++;
                        else st = (ch == '\r') ? 1 : 0;
                        if (st == 4) {
                            st = 0;
                            size_t need = s->len + sizeof HTTP_RESP - 1;
                            if (need > s->cap) { s->cap = need * 2; s->buf = realloc(s->buf, s->cap); }
                            memcpy(s->buf + s->len, HTTP_RESP, sizeof HTTP_RESP - 1);
                            s->len += sizeof HTTP_RESP - 1;
                        }
                        s->http_state = st;
                    }
                    continue;
                }
                if (olen) {
                    if (s->off == s->len) {   /* try to write straight away */
                        ssize_t w = send(fd, out, olen, MSG_NOSIGNAL);
                        if (w < 0) { if (errno != EAGAIN) { closed = 1; break; } w = 0; }
                        out += w; olen -= w;
                    }
                    if (olen) {
                        size_t need = s->len + olen;
                        if (need > s->cap) { s->cap = need * 2; s->buf = realloc(s->buf, s->cap); }
                        memcpy(s->buf + s->len, out, olen);
                        s->len += olen;
                    }
                }
            }
            if (closed) {
                free(s->buf);
                memset(s, 0, sizeof *s);
                close(fd);
            }
        }
    }
    return 0;
}

/* ======================================================================== */
/* client (load generator)                                                  */
/* ======================================================================== */
typedef struct {
    int fd, connected, got_first;
    uint64_t sent, rcvd;        /* bytes, total */
    uint64_t req_off;           /* bytes of the current request sent */
    uint64_t rep_got;           /* bytes of the current reply received */
} cconn;

static int client_main(void) {
    const char *mode = opt("--mode", "pingpong");
    int m = strcmp(mode, "pingpong") == 0 ? 0 : strcmp(mode, "echo") == 0 ? 1 :
            strcmp(mode, "oneway") == 0 ? 2 : -1;
    if (m < 0) fail("unknown client mode");
    int port = atoi(opt("--port", "0"));
    int nconn = atoi(opt("--conns", "1"));
    int nidle = atoi(opt("--idle", "0"));
    uint64_t size = (uint64_t)optf("--size", 64);
    uint64_t reply = (uint64_t)optf("--reply", (double)size);
    int fill = atoi(opt("--fill", "120"));       /* payload byte ('x') */
    double warmup = optf("--warmup", 0.3), duration = optf("--duration", 1.0);
    double max_req = optf("--max-requests", 1e18);
    double setup_to = optf("--setup-timeout", 60);
    uint64_t window = (uint64_t)optf("--window", 1 << 20);
    int spid = atoi(opt("--pid", "0"));
    int cpu_a = -1, cpu_b = -1;
    const char *cpus = opt("--cpus", NULL);
    if (cpus) sscanf(cpus, "%d,%d", &cpu_a, &cpu_b);
    if (port <= 0 || nconn <= 0) fail("need --port and --conns");
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    double t_start = now(), setup_deadline = t_start + setup_to;

    /* payload: pingpong -> size bytes ending in '\n'; bulk -> CHUNK bytes */
    uint64_t plen = m == 0 ? size : CHUNK;
    char *payload = malloc(plen > CHUNK ? plen : CHUNK);
    memset(payload, fill, plen);
    if (m == 0) payload[plen - 1] = '\n';
    static char rbuf[CHUNK];

    /* idle connections first, in batches (the accept queue is bounded) */
    int *idle = calloc(nidle + 1, sizeof(int));
    for (int i = 0; i < nidle; i += 256) {
        int b = nidle - i < 256 ? nidle - i : 256;
        struct pollfd pf[256];
        for (int k = 0; k < b; k++) {
            idle[i + k] = connect_nb(port);
            pf[k].fd = idle[i + k]; pf[k].events = POLLOUT;
        }
        int left = b;
        while (left > 0) {
            if (now() > setup_deadline) fail("timeout connecting idle connections");
            int r = poll(pf, b, 100);
            if (r < 0 && errno != EINTR) die("poll");
            for (int k = 0; k < b; k++) {
                if (pf[k].fd >= 0 && pf[k].revents) {
                    int err = 0; socklen_t el = sizeof err;
                    getsockopt(pf[k].fd, SOL_SOCKET, SO_ERROR, &err, &el);
                    if (err) { errno = err; die("idle connect"); }
                    pf[k].fd = -1; left--;
                }
            }
        }
    }

    int ep = epoll_create1(0);
    cconn *c = calloc(nconn, sizeof *c);
    for (int i = 0; i < nconn; i++) {
        c[i].fd = connect_nb(port);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }

    uint64_t requests = 0, bytes_rx = 0, bytes_tx = 0;
    int first_done = 0;
    int phase = 0;                  /* 0 setup, 1 warmup, 2 measure */
    double t_phase = 0, t0 = 0, t1 = 0;
    uint64_t req0 = 0, rx0 = 0, tx0 = 0;
    long long sp0 = 0, sp1 = 0, ss0 = 0, ss1 = 0, ca0 = 0, ca1 = 0, cb0 = 0, cb1 = 0;
    double self0 = 0, self1 = 0, la0 = 0, la1 = 0;
    struct epoll_event evs[MAXEV];

    for (;;) {
        int n = epoll_wait(ep, evs, MAXEV, 10);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int e = 0; e < n; e++) {
            cconn *k = &c[evs[e].data.u32];
            if (!k->connected) {
                int err = 0; socklen_t el = sizeof err;
                getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) { errno = err; die("connect"); }
                if (!(evs[e].events & (EPOLLOUT | EPOLLIN))) continue;
                k->connected = 1;
            }
            if (evs[e].events & (EPOLLERR | EPOLLHUP)) fail("connection closed by server");
            /* read everything */
            for (;;) {
                ssize_t r = recv(k->fd, rbuf, sizeof rbuf, 0);
                if (r == 0) fail("connection closed by server");
                if (r < 0) { if (errno == EAGAIN) break; die("recv"); }
                k->rcvd += r; bytes_rx += r;
                if (m == 0) {
                    k->rep_got += r;
                    while (k->rep_got >= reply && k->req_off >= size) {
                        k->rep_got -= reply; k->req_off = 0; requests++;
                        if (!k->got_first) { k->got_first = 1; first_done++; }
                    }
                } else if (!k->got_first) { k->got_first = 1; first_done++; }
            }
            /* write what is allowed */
            for (;;) {
                const char *p; size_t len;
                if (m == 0) {
                    if (k->req_off >= size) break;
                    p = payload + k->req_off; len = size - k->req_off;
                } else {
                    if (m == 1 && k->sent - k->rcvd + CHUNK > window) break;
                    size_t o = k->sent % CHUNK;
                    p = payload + o; len = CHUNK - o;
                }
                ssize_t w = send(k->fd, p, len, MSG_NOSIGNAL);
                if (w < 0) { if (errno == EAGAIN) break; die("send"); }
                k->sent += w; bytes_tx += w;
                if (m == 0) k->req_off += w;
                else if (m == 2 && !k->got_first) { k->got_first = 1; first_done++; }
            }
        }
        double t = now();
        if (phase == 0) {
            if (first_done >= nconn) { phase = 1; t_phase = t; }
            else if (t > setup_deadline) fail("timeout: not every connection got a first reply");
        }
        if (phase == 1 && t - t_phase >= warmup) {
            phase = 2; t0 = t; req0 = requests; rx0 = bytes_rx; tx0 = bytes_tx;
            if (spid) sp0 = proc_ticks(spid, &ss0);
            if (cpu_a >= 0) ca0 = cpu_busy(cpu_a);
            if (cpu_b >= 0) cb0 = cpu_busy(cpu_b);
            self0 = self_cpu(); la0 = loadavg1();
        }
        if (phase == 2 && (t - t0 >= duration || (double)(requests - req0) >= max_req)) {
            t1 = t;
            if (spid) sp1 = proc_ticks(spid, &ss1);
            if (cpu_a >= 0) ca1 = cpu_busy(cpu_a);
            if (cpu_b >= 0) cb1 = cpu_busy(cpu_b);
            self1 = self_cpu(); la1 = loadavg1();
            break;
        }
    }
    double hz = (double)sysconf(_SC_CLK_TCK);
    printf("{\"ok\": true, \"mode\": \"%s\", \"conns\": %d, \"idle\": %d, "
           "\"setup_s\": %.6f, \"elapsed\": %.6f, \"requests\": %llu, "
           "\"bytes_rx\": %llu, \"bytes_tx\": %llu, \"t0\": %.6f, \"t1\": %.6f, "
           "\"server_cpu\": %.4f, \"server_sys\": %.4f, \"loadgen_cpu\": %.6f, "
           "\"cpu_busy_server\": %.4f, \"cpu_busy_loadgen\": %.4f, "
           "\"loadavg_before\": %.2f, \"loadavg_after\": %.2f}\n",
           mode, nconn, nidle, t_phase - t_start, t1 - t0,
           (unsigned long long)(requests - req0), (unsigned long long)(bytes_rx - rx0),
           (unsigned long long)(bytes_tx - tx0), t0, t1,
           spid ? (sp1 - sp0) / hz : -1.0, spid ? (ss1 - ss0) / hz : -1.0, self1 - self0,
           cpu_a >= 0 ? (ca1 - ca0) / hz : -1.0, cpu_b >= 0 ? (cb1 - cb0) / hz : -1.0,
           la0, la1);
    fflush(stdout);
    return 0;
}

/* ======================================================================== */
/* httpclient: the W4 floor                                                 */
/* ======================================================================== */
typedef struct { int fd, connected, done, rounds; size_t off, got, need; } hconn;

static int httpclient_main(void) {
    int port = atoi(opt("--port", "0"));
    int nconn = atoi(opt("--conns", "1000"));
    int rounds = atoi(opt("--rounds", "20"));
    double setup_to = optf("--setup-timeout", 60);
    if (port <= 0 || nconn <= 0 || rounds <= 0) fail("need --port, --conns, --rounds");
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    double la0 = loadavg1();
    double cpu0 = self_cpu();
    double t0 = now(), deadline = t0 + setup_to;
    int ep = epoll_create1(0);
    hconn *c = calloc(nconn, sizeof *c);
    static char rbuf[CHUNK];
    for (int i = 0; i < nconn; i++) {
        c[i].fd = connect_nb(port);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }
    int done = 0;
    long requests = 0;
    struct epoll_event evs[MAXEV];
    const size_t rqlen = sizeof HTTP_REQ - 1;
    char hdr[8192];
    while (done < nconn) {
        if (now() > deadline) fail("timeout in httpclient");
        int n = epoll_wait(ep, evs, MAXEV, 10);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int e = 0; e < n; e++) {
            hconn *k = &c[evs[e].data.u32];
            if (k->done) continue;
            if (!k->connected) {
                int err = 0; socklen_t el = sizeof err;
                getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) { errno = err; die("connect"); }
                k->connected = 1;
            }
            for (;;) {
                while (k->off < rqlen) {
                    ssize_t w = send(k->fd, HTTP_REQ + k->off, rqlen - k->off, MSG_NOSIGNAL);
                    if (w < 0) { if (errno == EAGAIN) break; die("send"); }
                    k->off += w;
                }
                ssize_t r = recv(k->fd, rbuf, sizeof rbuf, 0);
                if (r == 0) fail("server closed");
                if (r < 0) { if (errno == EAGAIN) break; die("recv"); }
                /* parse: headers end, then Content-Length bytes */
                if (k->got + r < sizeof hdr) memcpy(hdr + k->got, rbuf, r);
                k->got += r;
                if (!k->need) {
                    hdr[k->got < sizeof hdr ? k->got : sizeof hdr - 1] = 0;
                    char *end = strstr(hdr, "\r\n\r\n");
                    if (end) {
                        char *cl = strcasestr(hdr, "Content-Length:");
                        size_t body = cl ? (size_t)atol(cl + 15) : 0;
                        k->need = (end - hdr) + 4 + body;
                    }
                }
                if (k->need && k->got >= k->need) {
                    requests++;
                    k->rounds++; k->got = 0; k->need = 0; k->off = 0;
                    if (k->rounds >= rounds) {
                        k->done = 1; done++; close(k->fd);
                        break;
                    }
                }
            }
        }
    }
    double t1 = now();
    double cpu1 = self_cpu();
    printf("{\"ok\": true, \"requests\": %ld, \"elapsed\": %.6f, \"client_cpu\": %.6f, "
           "\"loadavg_before\": %.2f, \"loadavg_after\": %.2f}\n",
           requests, t1 - t0, cpu1 - cpu0, la0, loadavg1());
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    argc_g = argc; argv_g = argv;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) { fprintf(stderr, "usage: fabench server|client|httpclient ...\n"); return 2; }
    if (strcmp(argv[1], "server") == 0) return server_main();
    if (strcmp(argv[1], "client") == 0) return client_main();
    if (strcmp(argv[1], "httpclient") == 0) return httpclient_main();
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
