/* proxy.wire._relayloop: the steady-state relay loop of one session in C, without the GIL.
 *
 * proxy/native.py hands a session here once startup and authentication are done and the
 * Python relay (proxy/relay.py) is in its plain steady state (tracker FAST, nothing to
 * repair, no refused pipeline, both scanners at a frame boundary, nothing queued to write).
 * Loop(client_fd, server_fd, needles, rewriting, max_message) dup()s both sockets; run()
 * then relays both ways with poll() and non-blocking send/recv, the GIL released, doing what
 * the Python fast path does per socket read:
 *
 *   - frame scanning (the same v3 framing as frames.py);
 *   - FAST-mode tracking (tracker.py): cycles in flight, the message types sent since the
 *     last cycle end ("open"), reply types since the last ReadyForQuery ("since_ready"), the
 *     transaction status of the last ReadyForQuery, unsynced;
 *   - the mapped-name pre-filter (Rewriter.candidate): a Query's or Parse's text that is
 *     not one plain read and contains "u&" or a needle (lower-cased ASCII) is a hit;
 *   - with shadow reads on (reads=(names...), sample_rate=r), the shadow's pre-filter: a
 *     Parse whose text contains one of the relation names the shadow replays is a hit (Python
 *     remembers the statement to sample its executions); such a Query is a hit only when the
 *     loop's own sample (probability r) says yes, and then shadow_sampled() tells Python it
 *     must not sample again. An empty name (the dsn mode) matches every text;
 *   - statement kinds (classify.statement_kind) counted per Query/Parse;
 *   - with traffic=True, each such text noted (kind, statement name, text) for the traffic
 *     recorder: run() returns the notes, and stops to hand them over once they pass 64 KiB.
 *
 * Anything else stops the loop BEFORE the frame concerned, at a frame boundary: a pre-filter
 * hit, a client message other than Q/P/B/D/E/C/S/H (Terminate, FunctionCall, COPY data...), a
 * server ErrorResponse, ParameterStatus, CopyIn/CopyBoth response, a malformed or too long
 * frame, an "open"/"since_ready" list over 200 entries, EOF or an error on either socket,
 * stop() from another thread. run() then returns what Python needs to carry on where the
 * loop stopped (see run()'s docstring): bytes scanned but not yet written, per direction;
 * bytes read but not consumed (they start at a frame header); the rest of a frame being
 * streamed; the tracker fields.
 *
 * Memory: each direction has one buffer of 64 KiB, grown only to hold a whole Query or Parse
 * (at most max_whole bytes; a longer one stops the loop and Python buffers it as today).
 * Other frames are streamed: forwarded as they arrive, whatever their length. A side is read
 * only while its buffer has room, and room is made only by writing to the other side: that
 * is the backpressure (a client that stops reading stops the server being read).
 *
 * Counters (bytes each way, statements by kind) are read live by counters() from any thread.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define INITIAL_BUFFER (64 * 1024)
#define KINDS_MAX 200
/* statement texts noted for the traffic recorder before the loop hands them to Python */
#define NOTES_MAX (64 * 1024)

enum reason {
    R_STOPPED = 0,  /* stop() was called */
    R_CLIENT = 1,   /* a client frame needs Python */
    R_SERVER = 2,   /* a server frame needs Python */
    R_CLIENT_EOF = 3,
    R_SERVER_EOF = 4,
    R_CLIENT_ERROR = 5,
    R_SERVER_ERROR = 6,
    R_INTERNAL = 7, /* out of memory, poll failure */
    R_NOTES = 8,    /* the traffic notes are full (or were asked for): Python records them */
};

typedef struct {
    char *buf;
    size_t alloc;
    size_t head; /* first byte not yet written to the other side */
    size_t fwd;  /* end of what may be written (whole or streamed frames) */
    size_t len;  /* end of what was read */
    uint64_t stream_left; /* bytes of the frame being streamed still to arrive */
    int halted;  /* a frame at fwd needs Python */
} Dir;

typedef struct {
    PyObject_HEAD
    int client_fd, server_fd;
    int wake[2];
    int running;
    PyObject *needles; /* tuple of bytes, lower-case */
    int rewriting;     /* a rewriter exists: the pre-filter applies */
    long long max_message;
    size_t max_whole;
    Dir c2s, s2c;
    /* tracker (FAST mode) */
    long long cycles;
    unsigned char open[KINDS_MAX];
    int nopen;
    unsigned char since[KINDS_MAX];
    int nsince;
    unsigned char status;
    int unsynced;
    long long unexpected;
    int unnamed_parse;
    /* traffic notes: records of kind (1 byte), name length (4), name, sql length (4), sql */
    int traffic;
    char *notes;
    size_t notes_len, notes_alloc;
    uint64_t notes_count; /* read live by notes_pending() */
    /* counters, read live */
    uint64_t bytes_in, bytes_out, n_read, n_write, n_other;
    /* needles flattened for the loop (copied at construction; no Python objects used
     * while the GIL is released) */
    char **needle_ptr;
    size_t *needle_len;
    Py_ssize_t nneedles; /* all of them: [0, nmapped) mapped names, the rest the shadow's */
    Py_ssize_t nmapped;
    int shadow;          /* reads= was given: the shadow's pre-filter applies */
    uint64_t sample_below; /* a Query hit is sampled when the next random draw is below this */
    int sample_all;        /* sample_rate 1.0: every hit is sampled */
    uint64_t rng;          /* xorshift64 state (a sample, not a secret) */
    int sampled;           /* the loop stopped at a Query its sample took */
    char *lower;
    size_t lower_alloc;
} LoopObject;

/* --- statement kind (classify.statement_kind) and the pre-filter (Rewriter.candidate) -------- */

enum { K_OTHER = 0, K_READ = 1, K_WRITE = 2 };

static int
is_lead_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v' || c == '(';
}

static int
ascii_alpha(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* chr(c).isalpha() for a latin-1 code point */
static int
latin1_alpha(unsigned char c)
{
    if (ascii_alpha(c))
        return 1;
    if (c == 0xaa || c == 0xb5 || c == 0xba)
        return 1;
    return c >= 0xc0 && c != 0xd7 && c != 0xf7;
}

static int
word_kind(const unsigned char *w, size_t n, int *is_with)
{
    char low[9];
    *is_with = 0;
    if (n == 0 || n > 8)
        return K_OTHER;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = w[i];
        low[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
    low[n] = 0;
    static const char *reads[] = {"select", "with", "values", "table", "show", "fetch", NULL};
    static const char *writes[] = {"insert", "update", "delete", "merge", "copy", "truncate", NULL};
    for (int i = 0; reads[i]; i++)
        if (strcmp(low, reads[i]) == 0) {
            *is_with = (i == 1);
            return K_READ;
        }
    for (int i = 0; writes[i]; i++)
        if (strcmp(low, writes[i]) == 0)
            return K_WRITE;
    return K_OTHER;
}

/* the first keyword as classify.first_keyword finds it: blanks, parentheses and comments skipped */
static int
first_keyword_kind(const unsigned char *s, size_t end, int *is_with)
{
    size_t pos = 0;
    while (pos < end) {
        unsigned char c = s[pos];
        if (is_lead_space(c))
            pos++;
        else if (c == '-' && pos + 1 < end && s[pos + 1] == '-') {
            const unsigned char *nl = memchr(s + pos, '\n', end - pos);
            pos = nl ? (size_t)(nl - s) + 1 : end;
        }
        else if (c == '/' && pos + 1 < end && s[pos + 1] == '*') {
            size_t p = pos + 2, close = end;
            for (; p + 1 < end; p++)
                if (s[p] == '*' && s[p + 1] == '/') {
                    close = p;
                    break;
                }
            pos = close == end ? end : close + 2;
        }
        else
            break;
    }
    size_t stop = pos;
    while (stop < end && (latin1_alpha(s[stop]) || s[stop] == '_'))
        stop++;
    /* bytes.lower() lowers ASCII only: a non-ASCII word is no keyword */
    for (size_t i = pos; i < stop; i++)
        if (s[i] >= 0x80) {
            *is_with = 0;
            return K_OTHER;
        }
    return word_kind(s + pos, stop - pos, is_with);
}

/* classify.statement_kind: the _LEAD regex, else first_keyword */
static int
statement_kind(const unsigned char *s, size_t end, int *is_with)
{
    size_t pos = 0;
    while (pos < end && is_lead_space(s[pos]))
        pos++;
    size_t stop = pos;
    while (stop < end && (ascii_alpha(s[stop]) || s[stop] == '_'))
        stop++;
    if (stop > pos && !(stop < end && ((s[stop] >= '0' && s[stop] <= '9') || s[stop] == '$')))
        return word_kind(s + pos, stop - pos, is_with);
    return first_keyword_kind(s, end, is_with);
}

/* self->lower = the text with ASCII lower-cased (bytes.lower()); -1: out of memory */
static int
lower_into(LoopObject *self, const unsigned char *sql, size_t n)
{
    if (n > self->lower_alloc) {
        size_t want = n < 4096 ? 4096 : n;
        char *p = realloc(self->lower, want);
        if (p == NULL)
            return -1;
        self->lower = p;
        self->lower_alloc = want;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = sql[i];
        self->lower[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
    return 0;
}

/* does self->lower[0:n] contain one of needles [from, to)? (an empty needle matches all) */
static int
any_needle(LoopObject *self, Py_ssize_t from, Py_ssize_t to, size_t n)
{
    for (Py_ssize_t i = from; i < to; i++) {
        size_t ln = self->needle_len[i];
        if (ln == 0 || (ln <= n && memmem(self->lower, n, self->needle_ptr[i], ln) != NULL))
            return 1;
    }
    return 0;
}

/* Rewriter.candidate: could this text write a mapped table? */
static int
candidate(LoopObject *self, const unsigned char *sql, size_t n, int kind, int is_with_kw)
{
    if (!self->rewriting)
        return 0;
    if (kind == K_READ) {
        /* _single_read: a read that is not WITH, with no ';' before its trailing blanks */
        int with = 0;
        first_keyword_kind(sql, n, &with);
        if (!with) {
            size_t e = n;
            while (e > 0 && (sql[e - 1] == ' ' || sql[e - 1] == '\t' || sql[e - 1] == '\r' ||
                             sql[e - 1] == '\n' || sql[e - 1] == ';'))
                e--;
            if (memchr(sql, ';', e) == NULL)
                return 0;
        }
    }
    (void)is_with_kw;
    if (lower_into(self, sql, n) < 0)
        return 1; /* cannot tell: let Python look */
    if (n >= 2 && memmem(self->lower, n, "u&", 2) != NULL)
        return 1;
    return any_needle(self, 0, self->nmapped, n);
}

/* ShadowTap.candidate, more eagerly: does the text name a relation the shadow replays? (Not
 * only reads: Python's tap decides what is an eligible read, and samples it.) */
static int
shadow_candidate(LoopObject *self, const unsigned char *sql, size_t n)
{
    if (!self->shadow)
        return 0;
    if (lower_into(self, sql, n) < 0)
        return 1;
    return any_needle(self, self->nmapped, self->nneedles, n);
}

/* a simple Query the shadow may replay: stop for it only when the sample says yes, so an
 * unsampled read costs a draw, not a hand-back to Python */
static int
shadow_sample(LoopObject *self, const unsigned char *sql, size_t n)
{
    if (!self->shadow || (self->sample_below == 0 && !self->sample_all))
        return 0;
    uint64_t x = self->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    self->rng = x;
    if ((x >= self->sample_below && !self->sample_all) || !shadow_candidate(self, sql, n))
        return 0;
    self->sampled = 1;
    return 1;
}

static void
count_kind(LoopObject *self, int kind)
{
    uint64_t *slot = kind == K_READ ? &self->n_read : kind == K_WRITE ? &self->n_write : &self->n_other;
    __atomic_store_n(slot, __atomic_load_n(slot, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
}

/* append one traffic note; -1 when out of memory */
static int
note(LoopObject *self, unsigned char kind, const unsigned char *name, size_t nlen,
     const unsigned char *sql, size_t slen)
{
    size_t need = 1 + 4 + nlen + 4 + slen;
    if (self->notes_len + need > self->notes_alloc) {
        size_t want = self->notes_alloc ? self->notes_alloc : 4096;
        while (want < self->notes_len + need)
            want *= 2;
        char *p = realloc(self->notes, want);
        if (p == NULL)
            return -1;
        self->notes = p;
        self->notes_alloc = want;
    }
    char *o = self->notes + self->notes_len;
    uint32_t n32 = (uint32_t)nlen, s32 = (uint32_t)slen;
    *o++ = (char)kind;
    memcpy(o, &n32, 4);
    o += 4;
    memcpy(o, name, nlen);
    o += nlen;
    memcpy(o, &s32, 4);
    o += 4;
    memcpy(o, sql, slen);
    self->notes_len += need;
    __atomic_store_n(&self->notes_count, __atomic_load_n(&self->notes_count, __ATOMIC_RELAXED) + 1,
                     __ATOMIC_RELAXED);
    return 0;
}

/* --- frames ------------------------------------------------------------------------------ */

static int32_t
be32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) |
                     (uint32_t)p[3]);
}

/* Make room in d for a frame of `need` bytes at fwd: move the unwritten bytes to the front,
 * grow if needed. 0 on success. */
static int
make_room(Dir *d, size_t need)
{
    if (d->head > 0 && d->fwd == d->len && d->head == d->fwd) {
        d->head = d->fwd = d->len = 0;
    }
    if (d->alloc - d->fwd >= need)
        return 0;
    if (d->head > 0) {
        memmove(d->buf, d->buf + d->head, d->len - d->head);
        d->len -= d->head;
        d->fwd -= d->head;
        d->head = 0;
        if (d->alloc - d->fwd >= need)
            return 0;
    }
    size_t want = d->fwd + need;
    char *p = realloc(d->buf, want);
    if (p == NULL)
        return -1;
    d->buf = p;
    d->alloc = want;
    return 0;
}

/* Client frames in c2s from fwd on. Returns 0, or -1 when out of memory. */
static int
scan_client(LoopObject *self)
{
    Dir *d = &self->c2s;
    while (!d->halted) {
        if (d->stream_left) {
            size_t take = d->len - d->fwd;
            if (take > d->stream_left)
                take = (size_t)d->stream_left;
            d->fwd += take;
            d->stream_left -= take;
            if (d->stream_left)
                return 0;
            continue;
        }
        if (d->len - d->fwd < 5)
            return 0;
        const unsigned char *f = (const unsigned char *)d->buf + d->fwd;
        unsigned char typ = f[0];
        int32_t length = be32(f + 1);
        if (length < 4 || (long long)length > self->max_message) {
            d->halted = 1; /* Python refuses it */
            return 0;
        }
        size_t whole = 1 + (size_t)length;
        switch (typ) {
        case 'Q':
        case 'P': {
            if (whole > self->max_whole) {
                d->halted = 1;
                return 0;
            }
            if (d->len - d->fwd < whole) {
                if (d->alloc - d->fwd < whole && make_room(d, whole) < 0)
                    return -1;
                return 0; /* wait for the rest */
            }
            f = (const unsigned char *)d->buf + d->fwd;
            const unsigned char *body = f + 5;
            size_t blen = whole - 5;
            const unsigned char *sql = body;
            size_t sqllen;
            if (typ == 'Q') {
                if (self->nopen) {
                    /* a Query inside an unsynced batch: the tracker must become precise */
                    d->halted = 1;
                    return 0;
                }
                const unsigned char *nul = memchr(body, 0, blen);
                if (nul == NULL) {
                    d->halted = 1;
                    return 0;
                }
                sqllen = (size_t)(nul - body);
            }
            else {
                const unsigned char *nul = memchr(body, 0, blen);
                if (nul == NULL) {
                    d->halted = 1;
                    return 0;
                }
                int unnamed = nul == body;
                sql = nul + 1;
                size_t rest = blen - (size_t)(sql - body);
                const unsigned char *nul2 = memchr(sql, 0, rest);
                if (nul2 == NULL) {
                    d->halted = 1;
                    return 0;
                }
                sqllen = (size_t)(nul2 - sql);
                size_t after = rest - sqllen - 1;
                if (after < 2) {
                    d->halted = 1;
                    return 0;
                }
                int count = (int16_t)((nul2[1] << 8) | nul2[2]);
                if (count < 0 || (size_t)count * 4 > after - 2 || self->nopen >= KINDS_MAX) {
                    d->halted = 1;
                    return 0;
                }
                int is_with;
                int kind = statement_kind(sql, sqllen, &is_with);
                if (candidate(self, sql, sqllen, kind, is_with) ||
                    shadow_candidate(self, sql, sqllen)) {
                    d->halted = 1;
                    return 0;
                }
                if (self->traffic && note(self, 'P', body, (size_t)(nul - body), sql, sqllen) < 0)
                    return -1;
                if (unnamed)
                    self->unnamed_parse = 1;
                count_kind(self, kind);
                self->open[self->nopen++] = 'P';
                d->fwd += whole;
                continue;
            }
            int is_with;
            int kind = statement_kind(sql, sqllen, &is_with);
            if (candidate(self, sql, sqllen, kind, is_with) ||
                shadow_sample(self, sql, sqllen)) {
                d->halted = 1;
                return 0;
            }
            if (self->traffic && note(self, 'Q', body, 0, sql, sqllen) < 0)
                return -1;
            count_kind(self, kind);
            self->cycles++;
            self->unsynced = 0;
            d->fwd += whole;
            continue;
        }
        case 'S':
            self->cycles++;
            self->nopen = 0;
            self->unsynced = 0;
            break;
        case 'B':
        case 'D':
        case 'E':
        case 'C':
            if (self->nopen >= KINDS_MAX) {
                d->halted = 1;
                return 0;
            }
            self->open[self->nopen++] = typ;
            break;
        case 'H':
            break;
        default:
            d->halted = 1; /* Terminate, FunctionCall, COPY data, anything else */
            return 0;
        }
        /* a frame forwarded unread: streamed */
        d->stream_left = whole;
    }
    return 0;
}

static int
scan_server(LoopObject *self)
{
    Dir *d = &self->s2c;
    while (!d->halted) {
        if (d->stream_left) {
            size_t take = d->len - d->fwd;
            if (take > d->stream_left)
                take = (size_t)d->stream_left;
            d->fwd += take;
            d->stream_left -= take;
            if (d->stream_left)
                return 0;
            continue;
        }
        if (d->len - d->fwd < 5)
            return 0;
        const unsigned char *f = (const unsigned char *)d->buf + d->fwd;
        unsigned char typ = f[0];
        int32_t length = be32(f + 1);
        if (length < 4) {
            d->halted = 1;
            return 0;
        }
        size_t whole = 1 + (size_t)length;
        switch (typ) {
        case 'Z':
            if (length != 5) {
                d->halted = 1;
                return 0;
            }
            if (d->len - d->fwd < 6)
                return 0;
            __atomic_store_n(&self->status, f[5], __ATOMIC_RELAXED);
            self->cycles--;
            if (self->cycles < 0) {
                self->unexpected -= self->cycles;
                self->cycles = 0;
            }
            self->nsince = 0;
            d->fwd += 6;
            continue;
        case 'E': /* ErrorResponse: Python notes a FATAL */
        case 'S': /* ParameterStatus */
        case 'G': /* CopyInResponse */
        case 'W': /* CopyBothResponse */
            d->halted = 1;
            return 0;
        case 'D':
        case 'd':
        case 'N':
        case 'A':
            break;
        default:
            if (self->nsince >= KINDS_MAX) {
                d->halted = 1;
                return 0;
            }
            self->since[self->nsince++] = typ;
        }
        d->stream_left = whole;
    }
    return 0;
}

/* --- the loop ---------------------------------------------------------------------------- */

/* read what fits from fd into d; 1 read something, 0 nothing now, -2 EOF, -3 error */
static int
fill(Dir *d, int fd)
{
    if (d->head > 0 && d->head == d->len) {
        d->head = d->fwd = d->len = 0;
    }
    if (d->len == d->alloc) {
        if (d->head == 0)
            return 0; /* full: wait for the other side to take some */
        memmove(d->buf, d->buf + d->head, d->len - d->head);
        d->len -= d->head;
        d->fwd -= d->head;
        d->head = 0;
    }
    ssize_t n = recv(fd, d->buf + d->len, d->alloc - d->len, 0);
    if (n > 0) {
        d->len += (size_t)n;
        return 1;
    }
    if (n == 0)
        return -2;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return 0;
    return -3;
}

/* write what is forwardable; 0 ok (maybe partial), -3 error */
static int
flush(Dir *d, int fd)
{
    while (d->fwd > d->head) {
        ssize_t n = send(fd, d->buf + d->head, d->fwd - d->head, MSG_NOSIGNAL);
        if (n > 0) {
            d->head += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        return -3;
    }
    if (d->head == d->len) {
        d->head = d->fwd = d->len = 0;
    }
    return 0;
}

static int
has_room(Dir *d)
{
    return !d->halted && (d->len < d->alloc || d->head > 0);
}

static int
relay(LoopObject *self)
{
    for (;;) {
        if (self->notes_len >= NOTES_MAX)
            return R_NOTES;
        if (self->c2s.halted)
            return R_CLIENT;
        if (self->s2c.halted)
            return R_SERVER;
        struct pollfd p[3];
        p[0].fd = self->client_fd;
        p[0].events = (has_room(&self->c2s) ? POLLIN : 0) |
                      (self->s2c.fwd > self->s2c.head ? POLLOUT : 0);
        p[1].fd = self->server_fd;
        p[1].events = (has_room(&self->s2c) ? POLLIN : 0) |
                      (self->c2s.fwd > self->c2s.head ? POLLOUT : 0);
        p[2].fd = self->wake[0];
        p[2].events = POLLIN;
        p[0].revents = p[1].revents = p[2].revents = 0;
        int r = poll(p, 3, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return R_INTERNAL;
        }
        if (p[2].revents)
            return R_STOPPED;
        short bad = POLLERR | POLLHUP | POLLNVAL;
        if (p[0].revents & (POLLIN | bad)) {
            int got = fill(&self->c2s, self->client_fd);
            if (got == -2)
                return R_CLIENT_EOF;
            if (got == -3)
                return R_CLIENT_ERROR;
            if (got == 0 && (p[0].revents & POLLNVAL))
                return R_CLIENT_ERROR;
            size_t before = self->c2s.fwd;
            if (scan_client(self) < 0)
                return R_INTERNAL;
            __atomic_store_n(&self->bytes_in,
                             __atomic_load_n(&self->bytes_in, __ATOMIC_RELAXED) + (self->c2s.fwd - before),
                             __ATOMIC_RELAXED);
        }
        if (p[1].revents & (POLLIN | bad)) {
            int got = fill(&self->s2c, self->server_fd);
            if (got == -2)
                return R_SERVER_EOF;
            if (got == -3)
                return R_SERVER_ERROR;
            if (got == 0 && (p[1].revents & POLLNVAL))
                return R_SERVER_ERROR;
            size_t before = self->s2c.fwd;
            if (scan_server(self) < 0)
                return R_INTERNAL;
            __atomic_store_n(&self->bytes_out,
                             __atomic_load_n(&self->bytes_out, __ATOMIC_RELAXED) + (self->s2c.fwd - before),
                             __ATOMIC_RELAXED);
        }
        /* write as soon as there is something: most writes complete without a poll */
        if (flush(&self->c2s, self->server_fd) < 0)
            return R_SERVER_ERROR;
        if (flush(&self->s2c, self->client_fd) < 0)
            return R_CLIENT_ERROR;
    }
}

static void
dir_reset(Dir *d)
{
    d->head = d->fwd = d->len = 0;
    d->stream_left = 0;
    d->halted = 0;
}

static int
dir_load(Dir *d, const char *data, Py_ssize_t n)
{
    dir_reset(d);
    if (n <= 0)
        return 0;
    if ((size_t)n > d->alloc) {
        char *p = realloc(d->buf, (size_t)n);
        if (p == NULL)
            return -1;
        d->buf = p;
        d->alloc = (size_t)n;
    }
    memcpy(d->buf, data, (size_t)n);
    d->len = (size_t)n;
    return 0;
}

PyDoc_STRVAR(run_doc,
"run(cycles, open, since_ready, status, unsynced, client_in, server_in) -> tuple\n\n"
"Relay until something needs Python (GIL released). The arguments are the FAST tracker\n"
"state and bytes already read but not yet relayed (each starts at a frame header).\n"
"Returns (reason, to_server, client_in, client_stream_left, to_client, server_in,\n"
"server_stream_left, cycles, open, since_ready, status, unsynced, unexpected, unnamed_parse,\n"
"notes): notes is a list of (kind, name, sql), Query (81) and Parse (80) texts relayed.\n"
"to_server/to_client are scanned bytes still to write (write them first); client_in and\n"
"server_in are read bytes not yet consumed (they start at a frame header); *_stream_left\n"
"is the rest of a frame being forwarded unread (not arrived yet).");

static PyObject *
Loop_run(LoopObject *self, PyObject *args)
{
    long long cycles;
    const char *open, *since, *cin, *sin;
    Py_ssize_t nopen, nsince, ncin, nsin;
    int status, unsynced;
    if (!PyArg_ParseTuple(args, "Ly#y#ipy#y#", &cycles, &open, &nopen, &since, &nsince, &status,
                          &unsynced, &cin, &ncin, &sin, &nsin))
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "the loop is running");
        return NULL;
    }
    if (nopen > KINDS_MAX || nsince > KINDS_MAX) {
        PyErr_SetString(PyExc_ValueError, "open/since_ready too long for the native loop");
        return NULL;
    }
    if (self->client_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the loop is closed");
        return NULL;
    }
    self->cycles = cycles;
    memcpy(self->open, open, (size_t)nopen);
    self->nopen = (int)nopen;
    memcpy(self->since, since, (size_t)nsince);
    self->nsince = (int)nsince;
    self->status = (unsigned char)status;
    self->unsynced = unsynced;
    self->unexpected = 0;
    self->unnamed_parse = 0;
    if (dir_load(&self->c2s, cin, ncin) < 0 || dir_load(&self->s2c, sin, nsin) < 0)
        return PyErr_NoMemory();
    /* a stop() that came before this run still counts: the wake pipe is drained only after */
    self->running = 1;
    int reason;
    uint64_t in0 = self->bytes_in, out0 = self->bytes_out;
    Py_BEGIN_ALLOW_THREADS
    /* what was handed in is scanned first (and counted like what is read) */
    if (scan_client(self) < 0 || scan_server(self) < 0)
        reason = R_INTERNAL;
    else {
        __atomic_store_n(&self->bytes_in, in0 + self->c2s.fwd, __ATOMIC_RELAXED);
        __atomic_store_n(&self->bytes_out, out0 + self->s2c.fwd, __ATOMIC_RELAXED);
        reason = relay(self);
    }
    if (reason == R_STOPPED) {
        char drain[64];
        while (read(self->wake[0], drain, sizeof drain) > 0) {
        }
    }
    Py_END_ALLOW_THREADS
    self->running = 0;
    Dir *c = &self->c2s, *s = &self->s2c;
    PyObject *res = Py_BuildValue(
        "(iy#y#Ky#y#KLy#y#iiLi)", reason, c->buf + c->head, (Py_ssize_t)(c->fwd - c->head),
        c->buf + c->fwd, (Py_ssize_t)(c->len - c->fwd), (unsigned long long)c->stream_left,
        s->buf + s->head, (Py_ssize_t)(s->fwd - s->head), s->buf + s->fwd,
        (Py_ssize_t)(s->len - s->fwd), (unsigned long long)s->stream_left, self->cycles,
        (const char *)self->open, (Py_ssize_t)self->nopen, (const char *)self->since,
        (Py_ssize_t)self->nsince, (int)self->status, self->unsynced, self->unexpected,
        self->unnamed_parse);
    dir_reset(c);
    dir_reset(s);
    if (res == NULL)
        return NULL;
    PyObject *notes = PyList_New(0);
    if (notes == NULL) {
        Py_DECREF(res);
        return NULL;
    }
    size_t pos = 0;
    while (pos < self->notes_len) {
        const char *o = self->notes + pos;
        uint32_t n32, s32;
        memcpy(&n32, o + 1, 4);
        memcpy(&s32, o + 5 + n32, 4);
        PyObject *item = Py_BuildValue("(iy#y#)", (int)(unsigned char)o[0], o + 5, (Py_ssize_t)n32,
                                       o + 9 + n32, (Py_ssize_t)s32);
        if (item == NULL || PyList_Append(notes, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(notes);
            Py_DECREF(res);
            return NULL;
        }
        Py_DECREF(item);
        pos += 9 + (size_t)n32 + (size_t)s32;
    }
    self->notes_len = 0;
    __atomic_store_n(&self->notes_count, 0, __ATOMIC_RELAXED);
    if (self->notes_alloc > 4 * NOTES_MAX) {
        free(self->notes);
        self->notes = NULL;
        self->notes_alloc = 0;
    }
    PyObject *full = PyTuple_New(PyTuple_GET_SIZE(res) + 1);
    if (full == NULL) {
        Py_DECREF(notes);
        Py_DECREF(res);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(res); i++) {
        PyObject *item = PyTuple_GET_ITEM(res, i);
        Py_INCREF(item);
        PyTuple_SET_ITEM(full, i, item);
    }
    PyTuple_SET_ITEM(full, PyTuple_GET_SIZE(res), notes);
    Py_DECREF(res);
    return full;
}

static PyObject *
Loop_stop(LoopObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->wake[1] >= 0) {
        char one = 1;
        ssize_t n = write(self->wake[1], &one, 1);
        (void)n; /* a full pipe is already a pending stop */
    }
    Py_RETURN_NONE;
}

static PyObject *
Loop_counters(LoopObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KKKKK)", (unsigned long long)__atomic_load_n(&self->bytes_in, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&self->bytes_out, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&self->n_read, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&self->n_write, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&self->n_other, __ATOMIC_RELAXED));
}

static void
close_fds(LoopObject *self)
{
    int *fds[] = {&self->client_fd, &self->server_fd, &self->wake[0], &self->wake[1]};
    for (int i = 0; i < 4; i++)
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
}

static PyObject *
Loop_notes_pending(LoopObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->notes_count, __ATOMIC_RELAXED));
}

static PyObject *
Loop_shadow_sampled(LoopObject *self, PyObject *Py_UNUSED(ignored))
{
    int sampled = self->sampled;
    self->sampled = 0;
    return PyBool_FromLong(sampled);
}

static PyObject *
Loop_status(LoopObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(__atomic_load_n(&self->status, __ATOMIC_RELAXED));
}

static PyObject *
Loop_close(LoopObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "the loop is running");
        return NULL;
    }
    close_fds(self);
    Py_RETURN_NONE;
}

static PyObject *
Loop_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    LoopObject *self = (LoopObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->client_fd = self->server_fd = self->wake[0] = self->wake[1] = -1;
    self->status = 'I';
    return (PyObject *)self;
}

static void
free_needles(LoopObject *self)
{
    if (self->needle_ptr != NULL) {
        for (Py_ssize_t i = 0; i < self->nneedles; i++)
            free(self->needle_ptr[i]);
        free(self->needle_ptr);
        self->needle_ptr = NULL;
    }
    free(self->needle_len);
    self->needle_len = NULL;
    self->nneedles = 0;
}

static int
Loop_init(LoopObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client_fd", "server_fd", "needles", "rewriting", "max_message",
                             "max_whole", "traffic", "reads", "sample_rate", NULL};
    int cfd, sfd, rewriting, traffic = 0;
    PyObject *needles, *reads = NULL;
    long long max_message, max_whole = 1 << 20;
    double rate = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiO!pL|LpOd", kwlist, &cfd, &sfd, &PyTuple_Type,
                                     &needles, &rewriting, &max_message, &max_whole, &traffic,
                                     &reads, &rate))
        return -1;
    if (!(rate >= 0.0 && rate <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "sample_rate must be between 0 and 1");
        return -1;
    }
    /* a draw below rate * 2^64 is a yes; 1.0 takes every draw (sample_all) */
    self->sample_all = rate >= 1.0;
    self->sample_below = rate >= 1.0 ? UINT64_MAX : (uint64_t)(rate * 18446744073709551616.0);
    self->rng = ((uint64_t)(uintptr_t)self ^ (uint64_t)getpid() << 32) | 1;
    if (reads == Py_None)
        reads = NULL;
    if (reads != NULL && !PyTuple_Check(reads)) {
        PyErr_SetString(PyExc_TypeError, "reads must be a tuple of bytes or None");
        return -1;
    }
    self->traffic = traffic;
    if (self->client_fd >= 0 || self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Loop initialised twice");
        return -1;
    }
    if (max_whole < 6 || max_message < 4) {
        PyErr_SetString(PyExc_ValueError, "max_whole and max_message are too small");
        return -1;
    }
    Py_ssize_t nmapped = PyTuple_GET_SIZE(needles);
    Py_ssize_t n = nmapped + (reads != NULL ? PyTuple_GET_SIZE(reads) : 0);
    self->needle_ptr = calloc((size_t)n + 1, sizeof(char *));
    self->needle_len = calloc((size_t)n + 1, sizeof(size_t));
    if (self->needle_ptr == NULL || self->needle_len == NULL) {
        free_needles(self);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = i < nmapped ? PyTuple_GET_ITEM(needles, i)
                                     : PyTuple_GET_ITEM(reads, i - nmapped);
        if (!PyBytes_Check(item)) {
            self->nneedles = i;
            free_needles(self);
            PyErr_SetString(PyExc_TypeError, "needles must be bytes");
            return -1;
        }
        Py_ssize_t ln = PyBytes_GET_SIZE(item);
        self->needle_ptr[i] = malloc((size_t)ln + 1);
        if (self->needle_ptr[i] == NULL) {
            self->nneedles = i;
            free_needles(self);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(self->needle_ptr[i], PyBytes_AS_STRING(item), (size_t)ln);
        self->needle_len[i] = (size_t)ln;
    }
    self->nneedles = n;
    self->nmapped = nmapped;
    self->shadow = reads != NULL;
    self->rewriting = rewriting;
    self->max_message = max_message;
    self->max_whole = (size_t)max_whole;
    self->c2s.buf = malloc(INITIAL_BUFFER);
    self->s2c.buf = malloc(INITIAL_BUFFER);
    if (self->c2s.buf == NULL || self->s2c.buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->c2s.alloc = self->s2c.alloc = INITIAL_BUFFER;
    if (pipe2(self->wake, O_NONBLOCK | O_CLOEXEC) < 0) {
        self->wake[0] = self->wake[1] = -1;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->client_fd = fcntl(cfd, F_DUPFD_CLOEXEC, 0);
    self->server_fd = fcntl(sfd, F_DUPFD_CLOEXEC, 0);
    if (self->client_fd < 0 || self->server_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close_fds(self);
        return -1;
    }
    /* (the sockets are the event loop's, already non-blocking; the flag is per open file
     * description, which the duplicates share, so it is set once more only for safety) */
    fcntl(self->client_fd, F_SETFL, fcntl(self->client_fd, F_GETFL) | O_NONBLOCK);
    fcntl(self->server_fd, F_SETFL, fcntl(self->server_fd, F_GETFL) | O_NONBLOCK);
    return 0;
}

static void
Loop_dealloc(LoopObject *self)
{
    close_fds(self);
    free_needles(self);
    free(self->c2s.buf);
    free(self->s2c.buf);
    free(self->lower);
    free(self->notes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Loop_methods[] = {
    {"run", (PyCFunction)Loop_run, METH_VARARGS, run_doc},
    {"stop", (PyCFunction)Loop_stop, METH_NOARGS,
     "Make run() return (from any thread) as soon as it looks; a stop before run() counts."},
    {"counters", (PyCFunction)Loop_counters, METH_NOARGS,
     "(bytes client->server, bytes server->client, reads, writes, others), live."},
    {"notes_pending", (PyCFunction)Loop_notes_pending, METH_NOARGS,
     "Traffic notes taken since the last run() returned (live)."},
    {"shadow_sampled", (PyCFunction)Loop_shadow_sampled, METH_NOARGS,
     "True (once) when the loop stopped at a Query its shadow sample took (call after run())."},
    {"status", (PyCFunction)Loop_status, METH_NOARGS,
     "The transaction status byte of the last ReadyForQuery (live while run() runs)."},
    {"close", (PyCFunction)Loop_close, METH_NOARGS, "Close the duplicated sockets."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy.wire._relayloop.Loop",
    .tp_basicsize = sizeof(LoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native relay loop of one session (see the module docstring).",
    .tp_new = Loop_new,
    .tp_init = (initproc)Loop_init,
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_methods = Loop_methods,
};

static PyObject *
py_statement_kind(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int with;
    int kind = statement_kind((const unsigned char *)b.buf, (size_t)b.len, &with);
    PyBuffer_Release(&b);
    return PyUnicode_FromString(kind == K_READ ? "read" : kind == K_WRITE ? "write" : "other");
}

static PyObject *
py_candidate(PyObject *module, PyObject *args)
{
    Py_buffer b;
    PyObject *needles;
    if (!PyArg_ParseTuple(args, "y*O!", &b, &PyTuple_Type, &needles))
        return NULL;
    LoopObject tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.rewriting = 1;
    Py_ssize_t n = PyTuple_GET_SIZE(needles);
    char *ptrs[64];
    size_t lens[64];
    if (n > 64) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "at most 64 needles here");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(needles, i);
        if (!PyBytes_Check(item)) {
            PyBuffer_Release(&b);
            PyErr_SetString(PyExc_TypeError, "needles must be bytes");
            return NULL;
        }
        ptrs[i] = PyBytes_AS_STRING(item);
        lens[i] = (size_t)PyBytes_GET_SIZE(item);
    }
    tmp.needle_ptr = ptrs;
    tmp.needle_len = lens;
    tmp.nneedles = n;
    tmp.nmapped = n;
    int with;
    const unsigned char *s = (const unsigned char *)b.buf;
    int kind = statement_kind(s, (size_t)b.len, &with);
    int hit = candidate(&tmp, s, (size_t)b.len, kind, with);
    free(tmp.lower);
    PyBuffer_Release(&b);
    return PyBool_FromLong(hit);
}

static PyMethodDef methods[] = {
    {"statement_kind", py_statement_kind, METH_O, "classify.statement_kind, as the loop counts it."},
    {"candidate", py_candidate, METH_VARARGS,
     "candidate(sql, needles): Rewriter.candidate as the loop's pre-filter decides it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_relayloop", "The native relay loop (see proxy/native.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__relayloop(void)
{
    if (PyType_Ready(&LoopType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    Py_INCREF(&LoopType);
    if (PyModule_AddObject(mod, "Loop", (PyObject *)&LoopType) < 0) {
        Py_DECREF(&LoopType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
