/*
 * remus-guest: workloads for the remus test guest (built static, runs in the
 * busybox initramfs; started by tests/guest/init from the kernel command line).
 *
 *   remus-guest counter GPA
 *       Map GPA (page aligned, must lie in a region reserved with memmap=,
 *       because Debian's kernel has CONFIG_STRICT_DEVMEM) through /dev/mem and
 *       increment a 64-bit counter there every 1 ms (absolute 1 ms deadlines,
 *       +1 per tick; ticks missed while the guest was stalled or frozen are
 *       not caught up, so it is a monotonic tick count, not a clock).
 *       Prints "remus-guest: counter=<n>" every second.
 *
 *   remus-guest dirty PAGES_PER_SEC WSS_MIB CHECK
 *       Memory dirtier and consistency checker in ONE single-threaded loop
 *       (see README.md for the invariant). CHECK is 0 or 1.
 *
 *   remus-guest tcp PORT [GPA]
 *       Line-based TCP service: every line received is answered with
 *       "seq=<s> counter=<c> echo=<line>\n". <c> is the 64-bit value at GPA
 *       if given, else an internal per-process request counter. <s> is a
 *       per-connection sequence number starting at 1.
 *
 * All output goes to stdout (the serial console), one write() per line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define MID (WORDS / 2)
#define LAST (WORDS - 1)

static void say(const char *fmt, ...)
{
	char buf[1024];
	int n = snprintf(buf, sizeof buf, "remus-guest: ");
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	/* one write per line so concurrent workloads do not interleave */
	ssize_t off = 0;
	while (off < n) {
		ssize_t w = write(1, buf + off, n - off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		off += w;
	}
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void nap(double sec)
{
	struct timespec ts = { (time_t)sec, (long)((sec - (time_t)sec) * 1e9) };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Map the page containing gpa; return a pointer to the 64-bit word at gpa. */
static volatile uint64_t *map_gpa(uint64_t gpa, int writable)
{
	if (gpa & 7) {
		say("FATAL counter GPA 0x%" PRIx64 " not 8-byte aligned", gpa);
		return NULL;
	}
	int fd = open("/dev/mem", (writable ? O_RDWR : O_RDONLY) | O_SYNC);
	if (fd < 0) {
		say("FATAL open /dev/mem: %s", strerror(errno));
		return NULL;
	}
	uint64_t base = gpa & ~(uint64_t)(PAGE - 1);
	void *p = mmap(NULL, PAGE, PROT_READ | (writable ? PROT_WRITE : 0),
		       MAP_SHARED, fd, (off_t)base);
	close(fd);
	if (p == MAP_FAILED) {
		say("FATAL mmap /dev/mem at 0x%" PRIx64 ": %s (reserve it with "
		    "memmap=64K$0x%" PRIx64 ")", base, strerror(errno), base);
		return NULL;
	}
	return (volatile uint64_t *)((char *)p + (gpa - base));
}

static _Noreturn void park(void)
{
	/* A failed workload must not take the guest down; stay around quietly. */
	for (;;)
		pause();
}

/* ------------------------------------------------------------------ counter */

static _Noreturn void run_counter(uint64_t gpa)
{
	volatile uint64_t *c = map_gpa(gpa, 1);
	if (!c)
		park();
	*c = 0;
	say("counter at GPA 0x%" PRIx64 " started", gpa);
	double next = now() + 1.0;
	struct timespec dl;
	clock_gettime(CLOCK_MONOTONIC, &dl);
	for (;;) {
		/* absolute 1 ms deadlines, so the rate is ~1000/s despite the
		 * syscall overhead under TCG; after a stall (frozen, restored
		 * elsewhere) no catch-up burst: restart the deadlines from now */
		dl.tv_nsec += 1000000;
		if (dl.tv_nsec >= 1000000000) {
			dl.tv_nsec -= 1000000000;
			dl.tv_sec++;
		}
		struct timespec cur;
		clock_gettime(CLOCK_MONOTONIC, &cur);
		if ((cur.tv_sec - dl.tv_sec) * 1e9 + (cur.tv_nsec - dl.tv_nsec) > 10e6)
			dl = cur;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL) == EINTR)
			;
		*c = *c + 1; /* volatile 64-bit load + store */
		double t = now();
		if (t >= next) {
			say("counter=%" PRIu64, *c);
			next += 1.0;
			if (next < t) /* time jumped (frozen, restored elsewhere) */
				next = t + 1.0;
		}
	}
}

/* ---------------------------------------------------------- dirty + checker */

struct dstate {
	uint64_t completed; /* C: every page carries at least C */
	uint64_t pos;       /* k: pages 0..k-1 carry C+1, k..n-1 carry C */
	uint64_t pages;     /* n */
	uint64_t magic;
};
#define DMAGIC 0x72656d7573677374ULL /* "remusgst" */

static unsigned long check_ws(volatile uint64_t *ws, volatile struct dstate *st,
			      unsigned long *firstbad)
{
	uint64_t C = st->completed, k = st->pos, n = st->pages;
	unsigned long bad = 0;
	*firstbad = ~0UL;
	if (st->magic != DMAGIC || n == 0 || k >= n) {
		say("CHECKER FAIL state page corrupt: magic=0x%" PRIx64
		    " gen=%" PRIu64 " pos=%" PRIu64 " pages=%" PRIu64,
		    st->magic, C, k, n);
		return 1;
	}
	for (uint64_t i = 0; i < n; i++) {
		volatile uint64_t *p = ws + i * WORDS;
		uint64_t want = i < k ? C + 1 : C;
		uint64_t a = p[0], b = p[MID], z = p[LAST];
		if (a != want || b != want || z != want) {
			if (bad < 5)
				say("CHECKER FAIL page %" PRIu64 " words=%" PRIu64
				    "/%" PRIu64 "/%" PRIu64 " want %" PRIu64
				    " (gen=%" PRIu64 " pos=%" PRIu64 " pages=%" PRIu64 ")",
				    i, a, b, z, want, C, k, n);
			if (*firstbad == ~0UL)
				*firstbad = i;
			bad++;
		}
	}
	return bad;
}

static _Noreturn void run_dirty(double rate, unsigned long wss_mib, int check)
{
	size_t n = wss_mib * (1024 * 1024 / PAGE);
	if (n == 0) {
		say("FATAL dirty: working set of %lu MiB is empty", wss_mib);
		park();
	}
	void *mem = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	void *sp = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED || sp == MAP_FAILED) {
		say("FATAL dirty: mmap %zu pages: %s", n, strerror(errno));
		park();
	}
	if (mlock(mem, n * PAGE) < 0 || mlock(sp, PAGE) < 0)
		say("warning: mlock: %s", strerror(errno));
	volatile uint64_t *ws = mem;
	volatile struct dstate *st = sp;

	/* generation 1 everywhere, then dirty with 2, 3, ... */
	for (size_t i = 0; i < n; i++) {
		volatile uint64_t *p = ws + i * WORDS;
		p[0] = p[MID] = p[LAST] = 1;
	}
	st->completed = 1;
	st->pos = 0;
	st->pages = n;
	st->magic = DMAGIC;
	say("dirty started: rate=%.0f pages/s wss=%lu MiB pages=%zu check=%d",
	    rate, wss_mib, n, check);

	const double tick = 0.010;
	double t0 = now();
	double last_report = t0, next_report = t0; /* check at once, then 1/s */
	double credit = 0;                         /* pages owed */
	uint64_t dirtied = 0, dirtied_at_report = 0;
	unsigned long fails_total = 0, checks = 0;
	double prev = t0;

	for (;;) {
		double t = now();
		double dt = t - prev;
		prev = t;
		if (dt < 0)
			dt = 0;
		/* Catch up on the rate after a stall (guest frozen, restored
		 * elsewhere, or a host too slow for the rate), but never owe more
		 * than 100 ms of work, so that a tick stays short and the check
		 * still runs about every second. */
		credit += rate * dt;
		if (credit > rate * 0.1)
			credit = rate * 0.1;

		if (t >= next_report) {
			double span = t - last_report;
			double achieved =
				span > 0 ? (dirtied - dirtied_at_report) / span : 0;
			if (check) {
				unsigned long firstbad;
				unsigned long bad = check_ws(ws, st, &firstbad);
				checks++;
				if (bad) {
					fails_total++;
					say("CHECKER FAIL %lu of %" PRIu64
					    " pages inconsistent, first bad page %lu, "
					    "gen=%" PRIu64 " pos=%" PRIu64
					    " (failed checks so far: %lu of %lu)",
					    bad, st->pages, firstbad, st->completed,
					    st->pos, fails_total, checks);
				} else {
					say("check ok gen=%" PRIu64 " pos=%" PRIu64
					    " pages=%" PRIu64 " rate=%.0f/s target=%.0f/s"
					    " fails=%lu",
					    st->completed, st->pos, st->pages, achieved,
					    rate, fails_total);
				}
			} else {
				say("dirty gen=%" PRIu64 " pos=%" PRIu64
				    " pages=%" PRIu64 " rate=%.0f/s target=%.0f/s",
				    st->completed, st->pos, st->pages, achieved, rate);
			}
			last_report = t;
			dirtied_at_report = dirtied;
			next_report += 1.0;
			if (next_report < t)
				next_report = t + 1.0;
		}
		uint64_t todo = (uint64_t)credit;
		credit -= todo;
		if (todo) {
			uint64_t C = st->completed, k = st->pos;
			for (uint64_t j = 0; j < todo; j++) {
				volatile uint64_t *p = ws + k * WORDS;
				p[0] = C + 1;
				p[MID] = C + 1;
				p[LAST] = C + 1;
				k++;
				if (k == n) {
					/* order: completed first, then pos; the
					 * check runs only between ticks anyway */
					C++;
					st->completed = C;
					k = 0;
				}
				st->pos = k;
			}
			dirtied += todo;
		}

		nap(tick);
	}
}

/* ---------------------------------------------------------------------- tcp */

#define MAXC 64
#define LBUF 512

struct conn {
	int fd;
	uint64_t seq;
	size_t len;
	char buf[LBUF];
};

static _Noreturn void run_tcp(int port, uint64_t gpa, int have_gpa)
{
	volatile uint64_t *c = NULL;
	uint64_t internal = 0;
	if (have_gpa) {
		c = map_gpa(gpa, 0);
		if (!c)
			say("tcp: counter GPA unreadable, using internal counter");
	}
	signal(SIGPIPE, SIG_IGN);
	int ls = socket(AF_INET6, SOCK_STREAM, 0);
	int v6 = 1;
	if (ls < 0) {
		v6 = 0;
		ls = socket(AF_INET, SOCK_STREAM, 0);
	}
	if (ls < 0) {
		say("FATAL tcp: socket: %s", strerror(errno));
		park();
	}
	int one = 1, zero = 0;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	int r;
	if (v6) {
		setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
		struct sockaddr_in6 a = { .sin6_family = AF_INET6,
					  .sin6_port = htons(port),
					  .sin6_addr = IN6ADDR_ANY_INIT };
		r = bind(ls, (struct sockaddr *)&a, sizeof a);
	} else {
		struct sockaddr_in a = { .sin_family = AF_INET,
					 .sin_port = htons(port),
					 .sin_addr.s_addr = htonl(INADDR_ANY) };
		r = bind(ls, (struct sockaddr *)&a, sizeof a);
	}
	if (r < 0 || listen(ls, 16) < 0) {
		say("FATAL tcp: bind/listen port %d: %s", port, strerror(errno));
		park();
	}
	say("tcp listening on port %d", port);

	static struct conn cs[MAXC];
	for (int i = 0; i < MAXC; i++)
		cs[i].fd = -1;
	struct pollfd pf[MAXC + 1];
	for (;;) {
		int np = 0;
		pf[np++] = (struct pollfd){ .fd = ls, .events = POLLIN };
		for (int i = 0; i < MAXC; i++)
			pf[np++] = (struct pollfd){ .fd = cs[i].fd, .events = POLLIN };
		if (poll(pf, np, -1) < 0) {
			if (errno != EINTR)
				nap(0.1);
			continue;
		}
		if (pf[0].revents & POLLIN) {
			int fd = accept(ls, NULL, NULL);
			if (fd >= 0) {
				int i;
				for (i = 0; i < MAXC && cs[i].fd >= 0; i++)
					;
				if (i == MAXC) {
					close(fd);
				} else {
					setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
						   sizeof one);
					cs[i].fd = fd;
					cs[i].seq = 0;
					cs[i].len = 0;
				}
			}
		}
		for (int i = 0; i < MAXC; i++) {
			struct conn *k = &cs[i];
			if (k->fd < 0 || !(pf[i + 1].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			ssize_t got = read(k->fd, k->buf + k->len, LBUF - 1 - k->len);
			if (got <= 0) {
				if (got < 0 && errno == EINTR)
					continue;
				close(k->fd);
				k->fd = -1;
				continue;
			}
			k->len += got;
			char *nl;
			int dead = 0;
			while (!dead && (nl = memchr(k->buf, '\n', k->len))) {
				size_t ll = nl - k->buf;
				size_t el = ll;
				if (el && k->buf[el - 1] == '\r')
					el--;
				uint64_t val = c ? *c : ++internal;
				char out[LBUF + 96];
				int on = snprintf(out, sizeof out,
						  "seq=%" PRIu64 " counter=%" PRIu64 " echo=%.*s\n",
						  ++k->seq, val, (int)el, k->buf);
				if (write(k->fd, out, on) != on)
					dead = 1;
				memmove(k->buf, nl + 1, k->len - ll - 1);
				k->len -= ll + 1;
			}
			if (!dead && k->len >= LBUF - 1) /* overlong line: drop it */
				k->len = 0;
			if (dead) {
				close(k->fd);
				k->fd = -1;
			}
		}
	}
}

/* --------------------------------------------------------------------- main */

static _Noreturn void usage(void)
{
	fprintf(stderr,
		"usage: remus-guest counter GPA\n"
		"       remus-guest dirty PAGES_PER_SEC WSS_MIB CHECK(0|1)\n"
		"       remus-guest tcp PORT [GPA]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	setvbuf(stdout, NULL, _IONBF, 0);
	if (!strcmp(argv[1], "counter") && argc == 3)
		run_counter(strtoull(argv[2], NULL, 0));
	if (!strcmp(argv[1], "dirty") && argc == 5)
		run_dirty(strtod(argv[2], NULL), strtoul(argv[3], NULL, 0),
			  atoi(argv[4]));
	if (!strcmp(argv[1], "tcp") && (argc == 3 || argc == 4))
		run_tcp(atoi(argv[2]), argc == 4 ? strtoull(argv[3], NULL, 0) : 0,
			argc == 4);
	usage();
}
