/* remus-batch: a memory-heavy batch job for the workloads guest
 * (scripts/build-guest.sh --workloads; started by tests/guest/init with
 * remus.batch=MIB).
 *
 *   remus-batch MIB REPS [PAUSE_S]     run REPS repetitions now
 *   remus-batch serve PORT MIB         run one on request, over TCP
 *
 * Each repetition generates MIB MiB of 64-bit pseudo-random keys (xorshift64*,
 * fixed seed per repetition) in freshly mapped anonymous memory, sorts them
 * with an LSD radix sort (4 passes of 16 bits through a second MIB MiB buffer,
 * so every pass rewrites MIB MiB), checks that the result is sorted and
 * prints a checksum, then unmaps both buffers. Peak memory: 2 x MIB MiB.
 * Like an external sort's in-memory phase: it streams through and rewrites
 * all of its working set several times, the worst case for a checkpointing
 * system short of a pure page dirtier.
 *
 * Lines on the console (stdout), machine-readable:
 *   remus-guest: BATCH start rep=<i> mib=<MIB>
 *   remus-guest: BATCH done rep=<i> mib=<MIB> ms=<guest ms> gen_ms=<g> sort_ms=<s> sorted=<0|1> sum=<hex>
 *   remus-guest: BATCH all done reps=<REPS>
 * ms is the guest's CLOCK_MONOTONIC. Under TCG the guest's clock stops while
 * QEMU has the VM stopped (every checkpoint pause), so ms leaves the pauses
 * out: time the job on the host (the serial lines' arrival) for the real cost.
 * PAUSE_S (default 2) seconds of sleep between repetitions.
 *
 * serve: listens on TCP PORT (all addresses); per connection it reads one
 * line, "RUN [MIB]" (default: the MIB given), runs one repetition, prints
 * the lines above on the console and writes the "BATCH done ..." line (without
 * the "remus-guest: " prefix) back, then closes. One job at a time. The host
 * times the request: that is the job's real run time, pauses included.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t *map(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		printf("remus-guest: BATCH FATAL mmap %zu bytes failed\n", bytes);
		fflush(stdout);
		exit(2);
	}
	return p;
}

static uint64_t count[1 << 16];

/* One repetition; writes the done line (no prefix) to out. */
static void one_rep(long rep, size_t mib, char *out, size_t outlen)
{
	size_t n = mib * 1024 * 1024 / sizeof(uint64_t);
	printf("remus-guest: BATCH start rep=%ld mib=%zu\n", rep, mib);
	double t0 = now_ms();
	uint64_t *a = map(n * sizeof(uint64_t)), *b = map(n * sizeof(uint64_t));
	uint64_t x = 0x9E3779B97F4A7C15ull ^ (uint64_t)(rep + 1);
	uint64_t sum = 0;
	for (size_t i = 0; i < n; i++) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		a[i] = x * 0x2545F4914F6CDD1Dull;
		sum += a[i];
	}
	double t1 = now_ms();
	for (int pass = 0; pass < 4; pass++) {
		int shift = pass * 16;
		memset(count, 0, sizeof count);
		for (size_t i = 0; i < n; i++)
			count[(a[i] >> shift) & 0xffff]++;
		uint64_t pos = 0;
		for (size_t d = 0; d < (1u << 16); d++) {
			uint64_t c = count[d];
			count[d] = pos;
			pos += c;
		}
		for (size_t i = 0; i < n; i++)
			b[count[(a[i] >> shift) & 0xffff]++] = a[i];
		uint64_t *t = a;
		a = b;
		b = t;
	}
	int sorted = 1;
	uint64_t sum2 = n ? a[0] : 0;
	for (size_t i = 1; i < n; i++) {
		if (a[i - 1] > a[i])
			sorted = 0;
		sum2 += a[i];
	}
	if (sum2 != sum)
		sorted = 0;
	double t2 = now_ms();
	munmap(a, n * sizeof(uint64_t));
	munmap(b, n * sizeof(uint64_t));
	snprintf(out, outlen, "BATCH done rep=%ld mib=%zu ms=%.1f gen_ms=%.1f sort_ms=%.1f sorted=%d sum=%016llx\n",
		 rep, mib, t2 - t0, t1 - t0, t2 - t1, sorted, (unsigned long long)sum);
	printf("remus-guest: %s", out);
}

static int serve(int port, size_t mib)
{
	int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4)) {
		printf("remus-guest: BATCH FATAL cannot listen on %d\n", port);
		return 1;
	}
	printf("remus-guest: BATCH serving port=%d mib=%zu\n", port, mib);
	for (long rep = 0;; rep++) {
		int c = accept(ls, NULL, NULL);
		if (c < 0)
			continue;
		char line[128];
		size_t got = 0;
		while (got < sizeof line - 1) {
			ssize_t r = read(c, line + got, 1);
			if (r <= 0 || line[got] == '\n')
				break;
			got++;
		}
		line[got] = 0;
		size_t m = mib;
		if (strncmp(line, "RUN", 3) == 0 && line[3] == ' ')
			m = strtoul(line + 4, NULL, 0);
		char out[256];
		if (strncmp(line, "RUN", 3) != 0 || m == 0)
			snprintf(out, sizeof out, "BATCH error bad request\n");
		else
			one_rep(rep, m, out, sizeof out);
		ssize_t w = write(c, out, strlen(out));
		(void)w;
		close(c);
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 4 && strcmp(argv[1], "serve") == 0)
		return serve(atoi(argv[2]), strtoul(argv[3], NULL, 0));
	if (argc < 3) {
		fprintf(stderr, "usage: remus-batch MIB REPS [PAUSE_S] | remus-batch serve PORT MIB\n");
		return 2;
	}
	size_t mib = strtoul(argv[1], NULL, 0);
	long reps = strtol(argv[2], NULL, 0);
	int pause_s = argc > 3 ? atoi(argv[3]) : 2;
	char out[256];
	for (long rep = 0; rep < reps; rep++) {
		one_rep(rep, mib, out, sizeof out);
		if (rep + 1 < reps)
			sleep(pause_s);
	}
	printf("remus-guest: BATCH all done reps=%ld\n", reps);
	return 0;
}
