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
 *   remus-guest kv PORT DEV VALUE_KIB [GPA]
 *       The tcp service, plus a read-only key-value store whose data set is the
 *       block device DEV, read with plain pread() through the guest's page
 *       cache: value k is the VALUE_KIB KiB at byte k*VALUE_KIB*1024. A line
 *       "GET <k>" is answered with "seq=<s> counter=<c> key=<k> crc=<crc32 of
 *       the value, 8 hex digits>\n" (or "... key=<k> err=<reason>"); any
 *       other line is echoed as by tcp. The failover-latency benchmark's
 *       service: a data set larger than the guest's memory, so how warm the
 *       guest's page cache is shows in the latency.
 *
 *   remus-guest disk raw|fs DEV RATE VERIFY_SEC WINDOW SYNC [GPA]
 *       Disk record writer and verifier. raw: 4 KiB records written with
 *       O_DIRECT (+O_DSYNC if SYNC) to the block device DEV at seq*4096.
 *       fs: DEV is mounted as ext4 on /mnt/disk and the records go to
 *       /mnt/disk/records with pwrite (+fdatasync if SYNC). RATE records/s.
 *       After each completed write last_durable = seq is stored in memory (at
 *       GPA if given); every VERIFY_SEC seconds records 0..last_durable are
 *       read back with O_DIRECT (the newest WINDOW every time, older ones
 *       rolling, all of them within ~10 s). Record format: README.md and
 *       tests/guest/diskcheck.py.
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
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h> /* also BLKGETSIZE64, BLKSSZGET */
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
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
		say("FATAL GPA 0x%" PRIx64 " not 8-byte aligned", gpa);
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

static uint32_t crc32_buf(const void *p, size_t n);
static int wait_dev(const char *dev);

/* The kv data set (remus-guest kv): fd < 0 when the service is plain tcp. */
static struct {
	int fd;
	uint64_t nvals;
	size_t vsz;
	unsigned char *buf;
} kv = { .fd = -1 };

static int kv_open(const char *dev, unsigned long vkib)
{
	uint64_t size = 0;
	if (wait_dev(dev) < 0)
		return -1;
	kv.fd = open(dev, O_RDONLY | O_CLOEXEC); /* buffered: the page cache */
	if (kv.fd < 0 || ioctl(kv.fd, BLKGETSIZE64, &size) < 0 || !vkib) {
		say("FATAL kv: %s: %s", dev, strerror(errno));
		return -1;
	}
	kv.vsz = vkib * 1024;
	kv.nvals = size / kv.vsz;
	kv.buf = malloc(kv.vsz);
	if (!kv.buf || !kv.nvals) {
		say("FATAL kv: %s holds no %lu KiB value", dev, vkib);
		return -1;
	}
	say("kv: %" PRIu64 " values of %lu KiB on %s", kv.nvals, vkib, dev);
	return 0;
}

/* Formats the answer to a "GET <k>" line into out; returns its length. */
static int kv_get(const char *line, size_t len, uint64_t seq, uint64_t val,
		  char *out, size_t outsz)
{
	char num[32];
	size_t nl = len - 4 < sizeof num - 1 ? len - 4 : sizeof num - 1;
	memcpy(num, line + 4, nl);
	num[nl] = 0;
	char *end;
	uint64_t k = strtoull(num, &end, 10);
	const char *err = NULL;
	if (end == num || *end)
		err = "bad-key";
	else if (k >= kv.nvals)
		err = "out-of-range";
	size_t got = 0;
	while (!err && got < kv.vsz) {
		ssize_t r = pread(kv.fd, kv.buf + got, kv.vsz - got,
				  (off_t)(k * kv.vsz + got));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			err = r < 0 ? "io-error" : "short-read";
		else
			got += r;
	}
	if (err)
		return snprintf(out, outsz,
				"seq=%" PRIu64 " counter=%" PRIu64 " key=%s err=%s\n",
				seq, val, num, err);
	return snprintf(out, outsz,
			"seq=%" PRIu64 " counter=%" PRIu64 " key=%" PRIu64 " crc=%08x\n",
			seq, val, k, crc32_buf(kv.buf, kv.vsz));
}

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
				int on;
				if (kv.fd >= 0 && el > 4 && !memcmp(k->buf, "GET ", 4))
					on = kv_get(k->buf, el, ++k->seq, val, out, sizeof out);
				else
					on = snprintf(out, sizeof out,
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

/* --------------------------------------------------------------------- disk */

/*
 * A record is one 4 KiB block at offset seq*4096, little-endian:
 *   0 magic "RMSDREC1", 8 seq, 16 run id, 24 version (u32, 1), 28 kind (u32,
 *   1 raw device, 2 file), 32 write time (CLOCK_REALTIME ns, informational),
 *   40..4091 payload (the first 4052 bytes of the splitmix64 stream seeded
 *   with seq), 4092 crc32 (zlib's) of bytes 0..4091.
 * The host-side twin is tests/guest/diskcheck.py.
 */
#define REC 4096UL
#define RHDR 40
#define RPAY (REC - RHDR - 4)
#define RMAGIC 0x3143455244534d52ULL /* "RMSDREC1" */
#define SMAGIC 0x5441545344534d52ULL /* "RMSDSTAT" */
#define NONE (~(uint64_t)0)
#define RCHUNK 64 /* records per read while verifying */
#define MAXBADLINES 10

struct rec {
	uint64_t magic;
	uint64_t seq;
	uint64_t run;
	uint32_t version;
	uint32_t kind;
	uint64_t wtime;
	unsigned char payload[RPAY];
	uint32_t crc;
};
_Static_assert(sizeof(struct rec) == REC, "record size");

/* The writer's memory state; at the GPA of remus.diskgpa if given, so the
 * host can read it from a memory dump ("xp /4xg GPA"). */
struct diskstate {
	uint64_t last;     /* last durable seq (write returned), NONE: none yet */
	uint64_t inflight; /* seq being written, NONE between writes */
	uint64_t run;      /* run id of this boot */
	uint64_t magic;    /* "RMSDSTAT" */
};

/* crc32 as zlib computes it (reflected 0xedb88320), slicing-by-8: about 4x
 * the byte-wise speed, which matters under TCG (a verification pass over
 * 4096 records checksums 16 MiB). */
static uint32_t crctab[8][256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320U ^ (c >> 1) : c >> 1;
		crctab[0][i] = c;
	}
	for (uint32_t i = 0; i < 256; i++)
		for (int t = 1; t < 8; t++)
			crctab[t][i] = (crctab[t - 1][i] >> 8) ^
				       crctab[0][crctab[t - 1][i] & 0xff];
}

static uint32_t crc32_buf(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint32_t c = 0xffffffffU;
	for (; n >= 8; n -= 8, b += 8) { /* little-endian host (x86) */
		uint32_t lo, hi;
		memcpy(&lo, b, 4);
		memcpy(&hi, b + 4, 4);
		lo ^= c;
		c = crctab[7][lo & 0xff] ^ crctab[6][(lo >> 8) & 0xff] ^
		    crctab[5][(lo >> 16) & 0xff] ^ crctab[4][lo >> 24] ^
		    crctab[3][hi & 0xff] ^ crctab[2][(hi >> 8) & 0xff] ^
		    crctab[1][(hi >> 16) & 0xff] ^ crctab[0][hi >> 24];
	}
	while (n--)
		c = crctab[0][(c ^ *b++) & 0xff] ^ (c >> 8);
	return c ^ 0xffffffffU;
}

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void fill_payload(unsigned char *p, uint64_t seq)
{
	uint64_t s = seq;
	for (size_t i = 0; i < RPAY; i += 8) {
		uint64_t v = splitmix64(&s);
		memcpy(p + i, &v, RPAY - i < 8 ? RPAY - i : 8);
	}
}

static void make_rec(struct rec *r, uint64_t seq, uint64_t run, uint32_t kind)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	r->magic = RMAGIC;
	r->seq = seq;
	r->run = run;
	r->version = 1;
	r->kind = kind;
	r->wtime = (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
	fill_payload(r->payload, seq);
	r->crc = crc32_buf(r, REC - 4);
}

/* NULL if r is record seq of run, else why not (in why). */
static const char *bad_rec(const struct rec *r, uint64_t seq, uint64_t run,
			   char *why, size_t len)
{
	static unsigned char want[RPAY];
	if (r->magic != RMAGIC) {
		const unsigned char *b = (const void *)r;
		size_t i = 0;
		while (i < REC && !b[i])
			i++;
		snprintf(why, len, i == REC ? "zero" : "magic(got=0x%016" PRIx64 ")",
			 r->magic);
		return why;
	}
	uint32_t c = crc32_buf(r, REC - 4);
	if (c != r->crc) {
		snprintf(why, len, "crc(got=%08x want=%08x seq=%" PRIu64 ")", r->crc,
			 c, r->seq);
		return why;
	}
	if (r->seq != seq) {
		snprintf(why, len, "seq(got=%" PRIu64 ")", r->seq);
		return why;
	}
	if (r->run != run) {
		snprintf(why, len, "run(got=%016" PRIx64 " want=%016" PRIx64 ")",
			 r->run, run);
		return why;
	}
	fill_payload(want, seq);
	if (memcmp(r->payload, want, RPAY)) {
		snprintf(why, len, "payload");
		return why;
	}
	return NULL;
}

struct disk {
	const char *dev;
	int fs;
	int wfd, rfd;
	uint64_t cap; /* records that fit, NONE: unknown (file) */
	volatile struct diskstate *st;
	struct rec *rbuf; /* RCHUNK records, 4 KiB aligned */
	uint64_t roll;    /* rolling cursor in the older records */
	unsigned long passes, failed, mismatches, errors;
};

/* Check records [a, b); count the bad ones in *bad, return read errors. */
static unsigned long verify_range(struct disk *d, uint64_t a, uint64_t b,
				  uint64_t last, unsigned long *bad,
				  uint64_t *firstbad)
{
	unsigned long errs = 0;
	char why[160];
	while (a < b) {
		uint64_t n = b - a < RCHUNK ? b - a : RCHUNK;
		ssize_t got = pread(d->rfd, d->rbuf, n * REC, (off_t)(a * REC));
		if (got < 0) {
			if (errno == EINTR)
				continue;
			say("DISK ERROR read records %" PRIu64 "..%" PRIu64 ": %s dev=%s",
			    a, a + n - 1, strerror(errno), d->dev);
			errs++;
			a += n;
			continue;
		}
		for (uint64_t j = 0; j < n; j++) {
			const char *w;
			if ((uint64_t)got < (j + 1) * REC) {
				snprintf(why, sizeof why, "missing(eof)");
				w = why;
			} else {
				w = bad_rec(d->rbuf + j, a + j, d->st->run, why, sizeof why);
			}
			if (!w)
				continue;
			if (*bad < MAXBADLINES)
				say("DISK MISMATCH seq=%" PRIu64 " last=%" PRId64
				    " reason=%s dev=%s",
				    a + j, (int64_t)last, w, d->dev);
			if (*firstbad == NONE)
				*firstbad = a + j;
			(*bad)++;
		}
		a += n;
	}
	return errs;
}

/* One verification pass over 0..last (see the header comment). */
static void verify(struct disk *d, unsigned long window, double vint,
		   double achieved, double rate)
{
	uint64_t last = d->st->last;
	uint64_t n = last == NONE ? 0 : last + 1;
	unsigned long bad = 0, errs = 0, checked = 0;
	uint64_t firstbad = NONE;
	int full = 1;
	double t0 = now();
	if (n <= window) {
		errs += verify_range(d, 0, n, last, &bad, &firstbad);
		checked = n;
	} else {
		uint64_t old = n - window;
		/* the older records rolling: all of them within ~10 s */
		uint64_t step = (uint64_t)(old * (vint / 10.0)) + 1;
		if (step >= old) {
			step = old;
			d->roll = 0;
		} else {
			full = 0;
		}
		if (d->roll >= old)
			d->roll = 0;
		uint64_t a = d->roll, b = a + step;
		if (b > old) {
			errs += verify_range(d, a, old, last, &bad, &firstbad);
			b -= old;
			a = 0;
		}
		errs += verify_range(d, a, b, last, &bad, &firstbad);
		d->roll = b;
		errs += verify_range(d, old, n, last, &bad, &firstbad);
		checked = step + window;
	}
	d->passes++;
	d->mismatches += bad;
	d->errors += errs;
	if (bad || errs)
		d->failed++;
	if (bad)
		say("DISK MISMATCH summary bad=%lu checked=%lu first=%" PRIu64
		    " last=%" PRId64 " fails=%lu passes=%lu dev=%s",
		    bad, checked, firstbad, (int64_t)last, d->failed, d->passes,
		    d->dev);
	if (errs)
		say("DISK ERROR verify read_errors=%lu last=%" PRId64
		    " fails=%lu passes=%lu dev=%s",
		    errs, (int64_t)last, d->failed, d->passes, d->dev);
	if (!bad && !errs)
		say("DISK OK last=%" PRId64 " checked=%lu full=%d took=%.3fs "
		    "rate=%.0f/s target=%.0f/s fails=%lu dev=%s",
		    (int64_t)last, checked, full, now() - t0, achieved, rate,
		    d->failed, d->dev);
}

static int wait_dev(const char *dev)
{
	struct stat sb;
	for (int i = 0; i < 300; i++) { /* virtio_blk probes asynchronously */
		if (stat(dev, &sb) == 0)
			return 0;
		if (i == 10)
			say("disk: waiting for %s", dev);
		nap(0.1);
	}
	say("DISK ERROR no device node after 30 s (virtio-blk device attached?) dev=%s",
	    dev);
	return -1;
}

static int open_raw(struct disk *d, int dsync)
{
	d->wfd = open(d->dev, O_RDWR | O_DIRECT | (dsync ? O_DSYNC : 0));
	if (d->wfd < 0) {
		say("DISK ERROR open O_DIRECT: %s dev=%s", strerror(errno), d->dev);
		return -1;
	}
	d->rfd = d->wfd;
	uint64_t size = 0;
	int lbs = 0;
	if (ioctl(d->wfd, BLKGETSIZE64, &size) < 0 ||
	    ioctl(d->wfd, BLKSSZGET, &lbs) < 0) {
		say("DISK ERROR not a block device? (%s) dev=%s", strerror(errno), d->dev);
		return -1;
	}
	if (lbs <= 0 || REC % lbs) {
		say("DISK ERROR logical block size %d does not divide 4096 dev=%s",
		    lbs, d->dev);
		return -1;
	}
	d->cap = size / REC;
	if (d->cap == 0) {
		say("DISK ERROR %" PRIu64 " bytes, smaller than one record dev=%s",
		    size, d->dev);
		return -1;
	}
	return 0;
}

#define MNT "/mnt/disk"

static int open_fs(struct disk *d)
{
	mkdir("/mnt", 0755);
	mkdir(MNT, 0755);
	if (mount(d->dev, MNT, "ext4", 0, "") < 0) {
		int e = errno;
		say("DISK ERROR mount -t ext4 %s %s: %s%s dev=%s", d->dev, MNT,
		    strerror(e),
		    e == ENODEV ? " (ext4 module not loaded?)" :
		    e == EINVAL ? " (no ext4 filesystem on it? mkfs.ext4 it on the host)" : "",
		    d->dev);
		return -1;
	}
	d->wfd = open(MNT "/records", O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (d->wfd < 0) {
		say("DISK ERROR open " MNT "/records: %s dev=%s", strerror(errno), d->dev);
		return -1;
	}
	/* make the new directory entry durable before the first record */
	int dfd = open(MNT, O_RDONLY | O_DIRECTORY);
	if (dfd < 0 || fsync(d->wfd) < 0 || fsync(dfd) < 0) {
		say("DISK ERROR fsync " MNT ": %s dev=%s", strerror(errno), d->dev);
		return -1;
	}
	close(dfd);
	d->rfd = open(MNT "/records", O_RDONLY | O_DIRECT);
	if (d->rfd < 0) {
		say("DISK ERROR open " MNT "/records O_DIRECT: %s dev=%s",
		    strerror(errno), d->dev);
		return -1;
	}
	d->cap = NONE;
	return 0;
}

static _Noreturn void run_disk(int fs, const char *dev, double rate, double vint,
			       unsigned long window, int dsync, uint64_t gpa,
			       int have_gpa)
{
	static char devpath[256];
	static struct diskstate local;
	struct disk d = { .fs = fs, .wfd = -1, .rfd = -1, .st = &local };
	const char *name = fs ? "diskfs" : "disk";
	snprintf(devpath, sizeof devpath, "%s%s", strchr(dev, '/') ? "" : "/dev/", dev);
	d.dev = devpath;
	if (vint <= 0)
		vint = 1.0;
	crc_init();

	if (have_gpa) {
		if ((gpa & (PAGE - 1)) + sizeof(struct diskstate) > PAGE) {
			say("FATAL %s: state at GPA 0x%" PRIx64 " crosses a page", name, gpa);
			park();
		}
		d.st = (volatile struct diskstate *)map_gpa(gpa, 1);
		if (!d.st)
			park();
	}
	uint64_t run;
	if (getrandom(&run, sizeof run, 0) != sizeof run)
		run = (uint64_t)(now() * 1e9) ^ ((uint64_t)getpid() << 48);
	d.st->magic = SMAGIC;
	d.st->run = run;
	d.st->inflight = NONE;
	d.st->last = NONE;

	struct rec *w;
	if (posix_memalign((void **)&w, REC, REC) ||
	    posix_memalign((void **)&d.rbuf, REC, RCHUNK * REC)) {
		say("FATAL %s: out of memory", name);
		park();
	}
	if (wait_dev(d.dev) < 0 || (fs ? open_fs(&d) : open_raw(&d, dsync)) < 0) {
		say("FATAL %s: giving up on %s", name, d.dev);
		park();
	}
	char capbuf[32] = "until ENOSPC";
	if (d.cap != NONE)
		snprintf(capbuf, sizeof capbuf, "%" PRIu64, d.cap);
	char where[48] = "memory";
	if (have_gpa)
		snprintf(where, sizeof where, "GPA 0x%" PRIx64, gpa);
	say("%s started: %s%s rate=%.0f/s verify=%.1fs window=%lu sync=%d "
	    "records=%s run=%016" PRIx64 " state=%s",
	    name, fs ? MNT "/records on " : "", d.dev, rate, vint, window, dsync,
	    capbuf, run, where);

	double t0 = now();
	double next_write = t0, next_verify = t0 + vint, last_report = t0;
	uint64_t writes = 0, writes_at_report = 0;
	int full = 0;
	for (;;) {
		double t = now();
		if (!full && rate > 0 && t >= next_write) {
			/* continue after the last durable record, as memory says
			 * (after a failover too: never re-scan the disk) */
			uint64_t seq = d.st->last + 1; /* NONE + 1 == 0 */
			if (seq >= d.cap) {
				full = 1;
				say("DISK FULL last=%" PRId64 " records=%" PRIu64
				    " (writing stopped, verifying goes on) dev=%s",
				    (int64_t)d.st->last, d.cap, d.dev);
			} else {
				make_rec(w, seq, run, fs ? 2 : 1);
				d.st->inflight = seq;
				ssize_t r = pwrite(d.wfd, w, REC, (off_t)(seq * REC));
				int e = errno;
				if (r == (ssize_t)REC && fs && dsync && fdatasync(d.wfd) < 0) {
					e = errno;
					r = -2;
				}
				if (r == (ssize_t)REC) {
					d.st->last = seq; /* durable now */
					writes++;
				} else if (fs && (r >= 0 || e == ENOSPC || e == EFBIG)) {
					full = 1;
					say("DISK FULL last=%" PRId64 " (record %" PRIu64
					    ": %s; writing stopped, verifying goes on) dev=%s",
					    (int64_t)d.st->last, seq,
					    r >= 0 ? "short write" : strerror(e), d.dev);
				} else {
					d.errors++;
					say("DISK ERROR %s seq=%" PRIu64 ": %s (retry in 1 s) dev=%s",
					    r == -2 ? "fdatasync" : "write", seq,
					    r >= 0 ? "short write" : strerror(e), d.dev);
					next_write = t + 1.0;
				}
				d.st->inflight = NONE;
			}
			next_write += 1.0 / rate;
			/* behind by more than 100 ms (frozen, restored
			 * elsewhere, slow device): no catch-up burst */
			if (next_write < now() - 0.1)
				next_write = now();
		}
		t = now();
		if (t >= next_verify) {
			double span = t - last_report;
			verify(&d, window, vint,
			       span > 0 ? (writes - writes_at_report) / span : 0, rate);
			last_report = t;
			writes_at_report = writes;
			next_verify += vint;
			if (next_verify < now())
				next_verify = now() + vint;
		}
		double wake = next_verify;
		if (!full && rate > 0 && next_write < wake)
			wake = next_write;
		t = now();
		if (wake > t)
			nap(wake - t);
	}
}

/* --------------------------------------------------------------------- main */

static _Noreturn void usage(void)
{
	fprintf(stderr,
		"usage: remus-guest counter GPA\n"
		"       remus-guest dirty PAGES_PER_SEC WSS_MIB CHECK(0|1)\n"
		"       remus-guest tcp PORT [GPA]\n"
		"       remus-guest kv PORT DEV VALUE_KIB [GPA]\n"
		"       remus-guest disk raw|fs DEV RATE VERIFY_SEC WINDOW SYNC(0|1) [GPA]\n");
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
	if (!strcmp(argv[1], "kv") && (argc == 5 || argc == 6)) {
		crc_init();
		if (kv_open(argv[3], strtoul(argv[4], NULL, 0)) < 0)
			park();
		run_tcp(atoi(argv[2]), argc == 6 ? strtoull(argv[5], NULL, 0) : 0,
			argc == 6);
	}
	if (!strcmp(argv[1], "disk") && (argc == 8 || argc == 9) &&
	    (!strcmp(argv[2], "raw") || !strcmp(argv[2], "fs")))
		run_disk(!strcmp(argv[2], "fs"), argv[3], strtod(argv[4], NULL),
			 strtod(argv[5], NULL), strtoul(argv[6], NULL, 0),
			 atoi(argv[7]), argc == 9 ? strtoull(argv[8], NULL, 0) : 0,
			 argc == 9);
	usage();
}
