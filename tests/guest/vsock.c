/*
 * mvm-vsock: an AF_VSOCK netcat for the microvm-dev test guest (busybox nc
 * has no vsock), with a TCP client mode for bulk transfers.
 *
 *   mvm-vsock echo PORT        listen on (VMADDR_CID_ANY, PORT), print
 *                              "listening" on stdout once bound, accept one
 *                              connection and echo it until the peer's EOF
 *   mvm-vsock connect CID PORT copy stdin to the socket and the socket to
 *                              stdout at once; half-close at stdin's EOF,
 *                              exit at the socket's EOF
 *   mvm-vsock tcp IPV4 PORT    the same as connect, over a TCP connection
 *                              to the dotted-quad IPV4 (e.g. 10.0.2.1)
 *   mvm-vsock udp-echo PORT    bind UDP (0.0.0.0, PORT), print "listening",
 *                              and send every datagram back to its sender,
 *                              forever (busybox nc has no UDP)
 *   mvm-vsock tcp-sink PORT    listen on TCP (0.0.0.0, PORT), print
 *                              "listening", then forever accept connections
 *                              one after another, read each to its EOF and
 *                              close it (a host's upload target)
 *   mvm-vsock mmap FILE        map the first 4 KiB of FILE (at least that
 *                              long) shared and writable, write
 *                              "shared-mmap" at offset 0, msync, unmap;
 *                              then map it private, write "PRIVATE" at
 *                              offset 16 (never reaching the file), read
 *                              that back through the mapping; print
 *                              "mmap ok" when every read-back matched
 *   mvm-vsock watch DIR        inotify on DIR and every directory below it
 *                              (new ones as they appear), the shape of
 *                              `inotifywait -m -r`: print "ready N" once N
 *                              directories are watched, then one line
 *                              "EVENT path NS" per event (CREATE, DELETE,
 *                              MODIFY, CLOSE_WRITE, MOVED_FROM, MOVED_TO,
 *                              ATTRIB; ",ISDIR" for directories), path
 *                              relative to DIR, NS the guest's
 *                              CLOCK_REALTIME when it was read, forever
 *   mvm-vsock fpu ROUNDS       whether task switches keep user vector
 *                              registers: 4 processes each hold their own
 *                              pattern in %xmm8, then (when XCR0 enables
 *                              AVX state) in %ymm8, across ROUNDS busy
 *                              loops of a million iterations; print
 *                              "xcr0=N", then "xmm=kept|lost" and
 *                              "ymm=kept|lost|off"
 *
 * Every read and write is of up to 64 KiB.  That is what the tcp and
 * tcp-sink modes are for: busybox nc moves 1 KiB per system call, so on PVM hosts (below) its
 * transfers measure the interpreted syscall path, not the guest's TCP.
 *
 * Exit status 0 on success, 1 with a message on stderr on any error, 2 on
 * bad usage.
 *
 * Freestanding on purpose (no libc, raw x86-64 system calls): a static
 * glibc binary is about 670 KiB, and the guest kernel copies every byte of
 * the initramfs interpreted on the PVM development hosts (about 2.5 s per
 * MiB of boot time, see shared/HOST-KVM.md); this one is a few KiB.
 */

/* Headers for constants and types only: nothing of libc is linked. */
#include <asm/unistd.h>
#include <errno.h>
#include <linux/fcntl.h>
#include <linux/inotify.h>
#include <linux/mman.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>

/* ------------------------------------------------------------ system calls */

static long syscall6(long n, long a, long b, long c, long d, long e, long f)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

/* Each returns the result, or -errno as the kernel does. */
#define SYS3(n, a, b, c) syscall6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define SYS6(n, a, b, c, d, e, f) syscall6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))

static ssize_t sys_read(int fd, void *buf, size_t len) { return SYS3(__NR_read, fd, buf, len); }
static ssize_t sys_write(int fd, const void *buf, size_t len) { return SYS3(__NR_write, fd, buf, len); }
static ssize_t sys_recv(int fd, void *buf, size_t len, int flags)
{
	return SYS6(__NR_recvfrom, fd, buf, len, flags, 0, 0);
}
static ssize_t sys_send(int fd, const void *buf, size_t len, int flags)
{
	return SYS6(__NR_sendto, fd, buf, len, flags, 0, 0);
}

static __attribute__((noreturn)) void sys_exit(int status)
{
	for (;;)
		SYS3(__NR_exit_group, status, 0, 0);
}

/* -------------------------------------------------------------- messages */

static size_t str_len(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

static void put(int fd, const char *s) { sys_write(fd, s, str_len(s)); }

/* The errors a vsock connection can plausibly end with; others by number. */
static const struct {
	int err;
	const char *text;
} errors[] = {
	{ EPERM, "Operation not permitted" },
	{ EINTR, "Interrupted system call" },
	{ EIO, "Input/output error" },
	{ EBADF, "Bad file descriptor" },
	{ EAGAIN, "Resource temporarily unavailable" },
	{ ENOMEM, "Cannot allocate memory" },
	{ EACCES, "Permission denied" },
	{ EFAULT, "Bad address" },
	{ ENODEV, "No such device" },
	{ EINVAL, "Invalid argument" },
	{ EPIPE, "Broken pipe" },
	{ ENOTSOCK, "Socket operation on non-socket" },
	{ EPROTONOSUPPORT, "Protocol not supported" },
	{ EOPNOTSUPP, "Operation not supported" },
	{ EAFNOSUPPORT, "Address family not supported by protocol" },
	{ EADDRINUSE, "Address already in use" },
	{ EADDRNOTAVAIL, "Cannot assign requested address" },
	{ ENETUNREACH, "Network is unreachable" },
	{ ECONNABORTED, "Software caused connection abort" },
	{ ECONNRESET, "Connection reset by peer" },
	{ ENOTCONN, "Transport endpoint is not connected" },
	{ ETIMEDOUT, "Connection timed out" },
	{ ECONNREFUSED, "Connection refused" },
	{ EHOSTUNREACH, "No route to host" },
};

/* Decimal digits of v, written backwards from the end of buf. */
static char *fmt_uint(char *end, unsigned long v)
{
	*--end = 0;
	do
		*--end = (char)('0' + v % 10);
	while (v /= 10);
	return end;
}

/* "mvm-vsock: <what>: <error text> (errno N)" on stderr, then exit 1. */
static __attribute__((noreturn)) void fail(const char *what, long ret)
{
	char num[24];
	size_t i;
	int err = (int)-ret;

	put(2, "mvm-vsock: ");
	put(2, what);
	put(2, ": ");
	for (i = 0; i < sizeof(errors) / sizeof(errors[0]); i++) {
		if (errors[i].err == err) {
			put(2, errors[i].text);
			put(2, " ");
			break;
		}
	}
	put(2, "(errno ");
	put(2, fmt_uint(num + sizeof(num), (unsigned long)err));
	put(2, ")\n");
	sys_exit(1);
}

static __attribute__((noreturn)) void usage(void)
{
	put(2, "usage: mvm-vsock echo PORT\n"
	       "       mvm-vsock connect CID PORT\n"
	       "       mvm-vsock tcp IPV4 PORT\n"
	       "       mvm-vsock udp-echo PORT\n"
	       "       mvm-vsock tcp-sink PORT\n"
	       "       mvm-vsock mmap FILE\n"
	       "       mvm-vsock watch DIR\n"
	       "       mvm-vsock fpu ROUNDS\n");
	sys_exit(2);
}

/* A decimal number that fits in 32 bits, or usage(). */
static unsigned int parse_u32(const char *s)
{
	unsigned long v = 0;

	if (!*s)
		usage();
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			usage();
		v = v * 10 + (unsigned long)(*s - '0');
		if (v > 0xffffffffUL)
			usage();
	}
	return (unsigned int)v;
}

/* A TCP port, 1 to 65535, or usage(). */
static unsigned int parse_port(const char *s)
{
	unsigned int v = parse_u32(s);

	if (v == 0 || v > 65535)
		usage();
	return v;
}

/*
 * A dotted quad: exactly four decimal parts of 0 to 255, no leading zeros
 * (as inet_pton: "010" would be octal to inet_aton), nothing else; or
 * usage().  The address in network byte order, as the bytes of addr[].
 */
static void parse_ipv4(const char *s, unsigned char addr[4])
{
	int i;

	for (i = 0; i < 4; i++) {
		unsigned int v = 0, digits = 0;

		if (i > 0 && *s++ != '.')
			usage();
		for (; *s >= '0' && *s <= '9'; s++) {
			if (digits && v == 0)
				usage();
			v = v * 10 + (unsigned int)(*s - '0');
			if (v > 255)
				usage();
			digits++;
		}
		if (!digits)
			usage();
		addr[i] = (unsigned char)v;
	}
	if (*s)
		usage();
}

static void zero(void *p, size_t len)
{
	unsigned char *b = p;

	while (len--)
		*b++ = 0;
}

/* ------------------------------------------------------------ connections */

static int vsock(void)
{
	long fd = SYS3(__NR_socket, AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		fail("socket(AF_VSOCK)", fd);
	return (int)fd;
}

static void vsock_addr(struct sockaddr_vm *sa, unsigned int cid, unsigned int port)
{
	zero(sa, sizeof(*sa));
	sa->svm_family = AF_VSOCK;
	sa->svm_cid = cid;
	sa->svm_port = port;
}

/* Blocking: write all of buf to fd (a socket: no SIGPIPE, EPIPE instead). */
static void send_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = sys_send(fd, buf, len, MSG_NOSIGNAL);

		if (n == -EINTR)
			continue;
		if (n < 0)
			fail("write to the connection", n);
		buf += n;
		len -= (size_t)n;
	}
}

static void write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = sys_write(fd, buf, len);

		if (n == -EINTR)
			continue;
		if (n < 0)
			fail("write to stdout", n);
		buf += n;
		len -= (size_t)n;
	}
}

static char buf_in[65536];  /* stdin -> socket */
static char buf_out[65536]; /* socket -> stdout, and the echo buffer */

/*
 * Echo needs no poll: the peer reads while it writes, so blocking until a
 * chunk is written back cannot stall it for good.
 */
static int run_echo(unsigned int port)
{
	struct sockaddr_vm sa;
	int s = vsock();
	long ret, c;

	vsock_addr(&sa, VMADDR_CID_ANY, port);
	ret = SYS3(__NR_bind, s, &sa, sizeof(sa));
	if (ret < 0)
		fail("bind", ret);
	ret = SYS3(__NR_listen, s, 1, 0);
	if (ret < 0)
		fail("listen", ret);
	/* The caller's cue that a connection can come now. */
	put(1, "listening\n");
	do
		c = SYS3(__NR_accept4, s, 0, 0);
	while (c == -EINTR);
	if (c < 0)
		fail("accept", c);
	SYS3(__NR_close, s, 0, 0);
	for (;;) {
		ssize_t n = sys_recv((int)c, buf_out, sizeof(buf_out), 0);

		if (n == -EINTR)
			continue;
		if (n < 0)
			fail("read from the connection", n);
		if (n == 0)
			break;
		send_all((int)c, buf_out, (size_t)n);
	}
	ret = SYS3(__NR_shutdown, c, SHUT_WR, 0);
	if (ret < 0)
		fail("shutdown", ret);
	SYS3(__NR_close, c, 0, 0);
	return 0;
}

/*
 * Both directions of connected socket s at once, so that a peer echoing
 * what it reads never waits on us: socket I/O never blocks (MSG_DONTWAIT),
 * and each direction has its own buffer that poll() says when to fill or
 * drain.  stdout is written blocking (a file or a pipe, as in nc).
 */
static int relay(int s)
{
	struct pollfd fds[2];
	size_t in_len = 0, in_off = 0;
	int stdin_open = 1;
	long ret;

	for (;;) {
		/* fds[0]: stdin while our buffer is empty; fds[1]: the socket. */
		fds[0].fd = stdin_open && in_len == 0 ? 0 : -1;
		fds[0].events = POLLIN;
		fds[1].fd = s;
		fds[1].events = POLLIN | (in_len ? POLLOUT : 0);
		fds[0].revents = fds[1].revents = 0;
		ret = SYS3(__NR_poll, fds, 2, -1);
		if (ret == -EINTR)
			continue;
		if (ret < 0)
			fail("poll", ret);

		if (fds[0].revents) {
			ssize_t n = sys_read(0, buf_in, sizeof(buf_in));

			if (n < 0 && n != -EINTR && n != -EAGAIN)
				fail("read from stdin", n);
			if (n == 0) {
				stdin_open = 0;
				ret = SYS3(__NR_shutdown, s, SHUT_WR, 0);
				if (ret < 0)
					fail("shutdown", ret);
			}
			if (n > 0) {
				in_len = (size_t)n;
				in_off = 0;
			}
		}
		if (in_len && (fds[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
			ssize_t n = sys_send(s, buf_in + in_off, in_len, MSG_DONTWAIT | MSG_NOSIGNAL);

			if (n < 0 && n != -EINTR && n != -EAGAIN)
				fail("write to the connection", n);
			if (n > 0) {
				in_off += (size_t)n;
				in_len -= (size_t)n;
			}
		}
		if (fds[1].revents & (POLLIN | POLLERR | POLLHUP)) {
			ssize_t n = sys_recv(s, buf_out, sizeof(buf_out), MSG_DONTWAIT);

			if (n < 0 && n != -EINTR && n != -EAGAIN)
				fail("read from the connection", n);
			if (n == 0)
				break;
			if (n > 0)
				write_all(1, buf_out, (size_t)n);
		}
	}
	SYS3(__NR_close, s, 0, 0);
	return 0;
}

static int run_connect(unsigned int cid, unsigned int port)
{
	struct sockaddr_vm sa;
	int s = vsock();
	long ret;

	vsock_addr(&sa, cid, port);
	ret = SYS3(__NR_connect, s, &sa, sizeof(sa));
	if (ret < 0)
		fail("connect", ret);
	return relay(s);
}

/*
 * A new AF_INET socket of `type`, and `sa` set to ip:port (ip NULL: any
 * address), port and address in network byte order whatever the host's.
 */
static int inet_socket(int type, struct sockaddr_in *sa, const unsigned char *ip, unsigned int port)
{
	unsigned char *p = (unsigned char *)&sa->sin_port;
	long s = SYS3(__NR_socket, AF_INET, type | SOCK_CLOEXEC, 0);
	int i;

	if (s < 0)
		fail("socket(AF_INET)", s);
	zero(sa, sizeof(*sa));
	sa->sin_family = AF_INET;
	p[0] = (unsigned char)(port >> 8);
	p[1] = (unsigned char)port;
	p = (unsigned char *)&sa->sin_addr;
	for (i = 0; ip && i < 4; i++)
		p[i] = ip[i];
	return (int)s;
}

static int run_tcp(const unsigned char ip[4], unsigned int port)
{
	struct sockaddr_in sa;
	int s = inet_socket(SOCK_STREAM, &sa, ip, port);
	long ret = SYS3(__NR_connect, s, &sa, sizeof(sa));

	if (ret < 0)
		fail("connect", ret);
	return relay(s);
}

static int run_udp_echo(unsigned int port)
{
	struct sockaddr_in sa, from;
	int s = inet_socket(SOCK_DGRAM, &sa, 0, port);
	long ret = SYS3(__NR_bind, s, &sa, sizeof(sa));

	if (ret < 0)
		fail("bind", ret);
	put(1, "listening\n");
	for (;;) {
		socklen_t len = sizeof(from);
		ssize_t n = SYS6(__NR_recvfrom, s, buf_out, sizeof(buf_out), 0, &from, &len);

		if (n == -EINTR)
			continue;
		if (n < 0)
			fail("recvfrom", n);
		ret = SYS6(__NR_sendto, s, buf_out, n, 0, &from, len);
		if (ret < 0 && ret != -EINTR)
			fail("sendto", ret);
	}
}

/*
 * The host times an upload from its connect to our close, so the close
 * comes right after the EOF; a failed connection is closed and the next
 * one accepted, as a server would.
 */
static int run_tcp_sink(unsigned int port)
{
	struct sockaddr_in sa;
	int s = inet_socket(SOCK_STREAM, &sa, 0, port);
	int one = 1;
	long ret;

	/* A restarted sink rebinds over the last run's TIME_WAIT connections. */
	SYS6(__NR_setsockopt, s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one), 0);
	ret = SYS3(__NR_bind, s, &sa, sizeof(sa));
	if (ret < 0)
		fail("bind", ret);
	ret = SYS3(__NR_listen, s, 8, 0);
	if (ret < 0)
		fail("listen", ret);
	put(1, "listening\n");
	for (;;) {
		long c = SYS3(__NR_accept4, s, 0, SOCK_CLOEXEC);

		if (c == -EINTR || c == -ECONNABORTED)
			continue;
		if (c < 0)
			fail("accept", c);
		for (;;) {
			ssize_t n = sys_recv((int)c, buf_out, sizeof(buf_out), 0);

			if (n == -EINTR)
				continue;
			if (n <= 0)
				break;
		}
		SYS3(__NR_close, c, 0, 0);
	}
}

static int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* ------------------------------------------------------------ mmap */

static int mem_eq(const char *a, const char *b, size_t n)
{
	while (n--)
		if (*a++ != *b++)
			return 0;
	return 1;
}

static int run_mmap(const char *file)
{
	static char back[32];
	long fd = SYS3(__NR_openat, AT_FDCWD, file, O_RDWR | O_CLOEXEC);
	long map, r;

	if (fd < 0)
		fail("open", fd);
	map = SYS6(__NR_mmap, 0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map < 0 && map > -4096)
		fail("mmap MAP_SHARED", map);
	for (int i = 0; i < 11; i++)
		((char *)map)[i] = "shared-mmap"[i];
	r = SYS3(__NR_msync, map, 4096, MS_SYNC);
	if (r < 0)
		fail("msync", r);
	SYS3(__NR_munmap, map, 4096, 0);
	/* The file itself, read after the unmap, holds the shared write. */
	r = SYS6(__NR_pread64, fd, back, 11, 0, 0, 0);
	if (r != 11 || !mem_eq(back, "shared-mmap", 11))
		fail("read back the shared mapping's write", -EIO);
	map = SYS6(__NR_mmap, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (map < 0 && map > -4096)
		fail("mmap MAP_PRIVATE", map);
	for (int i = 0; i < 7; i++)
		((char *)map)[16 + i] = "PRIVATE"[i];
	if (!mem_eq((char *)map, "shared-mmap", 11) || !mem_eq((char *)map + 16, "PRIVATE", 7))
		fail("read back through the private mapping", -EIO);
	SYS3(__NR_munmap, map, 4096, 0);
	r = SYS6(__NR_pread64, fd, back, 7, 16, 0, 0);
	if (r != 7 || mem_eq(back, "PRIVATE", 7))
		fail("the private mapping's write reached the file", -EIO);
	SYS3(__NR_close, fd, 0, 0);
	put(1, "mmap ok\n");
	return 0;
}

/* ------------------------------------------------------------ watch */

#define MAX_WATCHES 65536
#define PATH_POOL (8 << 20)
#define WATCH_MASK (IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_ONLYDIR | IN_DONT_FOLLOW)

static int watch_fd;
static unsigned int watched;
/* wd -> offset of its relative path in pool (0: none; pool[0] is ""). */
static unsigned int wd_path[MAX_WATCHES];
static char pool[PATH_POOL];
static size_t pool_used = 1;
static char dir_root[4096];
static char scratch[8192];
static char out_line[8192];
static char dents[32768];

/* root + "/" + rel into scratch. */
static const char *host_path(const char *rel)
{
	size_t n = str_len(dir_root), m = str_len(rel);

	if (n + 1 + m + 1 > sizeof(scratch))
		return 0;
	for (size_t i = 0; i < n; i++)
		scratch[i] = dir_root[i];
	scratch[n] = '/';
	for (size_t i = 0; i <= m; i++)
		scratch[n + 1 + i] = rel[i];
	return scratch;
}

/* dir + "/" + name (or name alone at the top) stored in the pool. */
static unsigned int store(const char *dir, const char *name)
{
	size_t d = str_len(dir), m = str_len(name), need = d + (d ? 1 : 0) + m + 1;
	unsigned int at = (unsigned int)pool_used;

	if (pool_used + need > PATH_POOL)
		return 0;
	for (size_t i = 0; i < d; i++)
		pool[pool_used++] = dir[i];
	if (d)
		pool[pool_used++] = '/';
	for (size_t i = 0; i <= m; i++)
		pool[pool_used++] = name[i];
	return at;
}

static unsigned char wd_set[MAX_WATCHES];
static unsigned int stack[MAX_WATCHES];

/* Watch the directory at pool offset rel and every one below it
 * (iteratively: dents and scratch are shared). */
static void add_dir(unsigned int rel)
{
	size_t top = 0;

	stack[top++] = rel;
	while (top) {
		unsigned int cur = stack[--top];
		const char *path = host_path(pool + cur);
		long wd, fd, n;

		if (!path)
			continue;
		wd = SYS3(__NR_inotify_add_watch, watch_fd, path, WATCH_MASK);
		if (wd < 0 || wd >= MAX_WATCHES)
			continue;
		if (!wd_set[wd])
			watched++;
		wd_set[wd] = 1;
		wd_path[wd] = cur;
		fd = SYS3(__NR_openat, AT_FDCWD, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (fd < 0)
			continue;
		while ((n = SYS3(__NR_getdents64, fd, dents, sizeof(dents))) > 0) {
			long at = 0;

			while (at < n) {
				/* struct linux_dirent64: ino 8, off 8, reclen 2, type 1, name */
				unsigned short reclen = *(unsigned short *)(dents + at + 16);
				unsigned char type = (unsigned char)dents[at + 18];
				const char *name = dents + at + 19;
				unsigned int child;

				at += reclen;
				if (type != 4 /* DT_DIR */ || str_eq(name, ".") || str_eq(name, ".."))
					continue;
				child = store(pool + cur, name);
				if (child && top < MAX_WATCHES)
					stack[top++] = child;
			}
		}
		SYS3(__NR_close, fd, 0, 0);
	}
}

static void emit(const char *event, int isdir, const char *dir, const char *name, const char *when)
{
	size_t n = 0;
	const char *parts[7] = { event, isdir ? ",ISDIR " : " ", dir, *dir ? "/" : "", name, " ", when };

	for (int i = 0; i < 7; i++)
		for (const char *p = parts[i]; *p && n < sizeof(out_line) - 2; p++)
			out_line[n++] = *p;
	out_line[n++] = '\n';
	write_all(1, out_line, n);
}

static int run_watch(const char *dir)
{
	static char events[65536];
	char num[24];
	size_t n = str_len(dir);

	if (n == 0 || n >= sizeof(dir_root))
		usage();
	for (size_t i = 0; i <= n; i++)
		dir_root[i] = dir[i];
	watch_fd = (int)SYS3(__NR_inotify_init1, IN_CLOEXEC, 0, 0);
	if (watch_fd < 0)
		fail("inotify_init1", watch_fd);
	pool[0] = 0;
	add_dir(0);
	if (!watched)
		fail("inotify_add_watch", -ENOENT);
	put(1, "ready ");
	put(1, fmt_uint(num + sizeof(num), watched));
	put(1, "\n");
	for (;;) {
		ssize_t len = sys_read(watch_fd, events, sizeof(events));
		ssize_t at = 0;
		struct {
			long sec, nsec;
		} now = { 0, 0 };
		char when[24];
		const char *when_s;

		SYS3(__NR_clock_gettime, 0 /* CLOCK_REALTIME */, &now, 0);
		when_s = fmt_uint(when + sizeof(when), (unsigned long)now.sec * 1000000000UL + (unsigned long)now.nsec);

		if (len == -EINTR)
			continue;
		if (len <= 0)
			fail("read inotify", len);
		while (at + (ssize_t)sizeof(struct inotify_event) <= len) {
			struct inotify_event *ev = (struct inotify_event *)(events + at);
			const char *name = ev->len ? ev->name : "";
			const char *base = ev->wd > 0 && ev->wd < MAX_WATCHES && wd_set[ev->wd] ? pool + wd_path[ev->wd] : "";
			int isdir = (ev->mask & IN_ISDIR) != 0;
			static const struct {
				unsigned int bit;
				const char *name;
			} kinds[] = {
				{ IN_CREATE, "CREATE" },     { IN_DELETE, "DELETE" },
				{ IN_MODIFY, "MODIFY" },     { IN_CLOSE_WRITE, "CLOSE_WRITE" },
				{ IN_MOVED_FROM, "MOVED_FROM" }, { IN_MOVED_TO, "MOVED_TO" },
				{ IN_ATTRIB, "ATTRIB" },
			};

			at += (ssize_t)sizeof(struct inotify_event) + ev->len;
			if (ev->mask & IN_Q_OVERFLOW)
				put(1, "OVERFLOW\n");
			if (!*name)
				continue;
			for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
				if (ev->mask & kinds[i].bit)
					emit(kinds[i].name, isdir, base, name, when_s);
			if (isdir && (ev->mask & (IN_CREATE | IN_MOVED_TO))) {
				unsigned int child = store(base, name);

				if (child)
					add_dir(child);
			}
		}
	}
}

/* ------------------------------------------------------------------ fpu */

/*
 * XCR0 as user space sees it (glibc decides on AVX from it), or 0 when
 * CPUID says the OS has not enabled XSAVE and XGETBV would fault.
 */
static unsigned long user_xcr0(void)
{
	unsigned int a, b, c, d, lo, hi;

	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
	if (!(c & (1u << 27))) /* OSXSAVE */
		return 0;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return ((unsigned long)hi << 32) | lo;
}

#define XCR0_SSE_AVX 0x6UL

/* Rounds in which %ymm8 (or %xmm8) changed while this task spun. */
static unsigned long fpu_rounds(unsigned int seed, unsigned int rounds, int ymm)
{
	unsigned long changed = 0;

	for (unsigned int i = 0; i < rounds; i++) {
		unsigned int want[8], got[8];

		for (unsigned int k = 0; k < 8; k++) {
			want[k] = seed * 2654435761u + i * 8 + k;
			got[k] = want[k];
		}
		/* The spin keeps the register live across timer-driven switches. */
		if (ymm)
			__asm__ volatile("vmovdqu %1, %%ymm8\n"
					 "mov $1000000, %%ecx\n"
					 "1: dec %%ecx\n"
					 "jnz 1b\n"
					 "vmovdqu %%ymm8, %0\n"
					 "vzeroupper\n"
					 : "=m"(got)
					 : "m"(want)
					 : "xmm8", "ecx", "memory");
		else
			__asm__ volatile("movdqu %1, %%xmm8\n"
					 "mov $1000000, %%ecx\n"
					 "1: dec %%ecx\n"
					 "jnz 1b\n"
					 "movdqu %%xmm8, %0\n"
					 : "=m"(got)
					 : "m"(want)
					 : "xmm8", "ecx", "memory");
		if (!mem_eq((const char *)want, (const char *)got, sizeof(want)))
			changed++;
	}
	return changed;
}

#define FPU_TASKS 4

/* "kept" when no task saw its register change, else "lost". */
static const char *fpu_phase(unsigned int rounds, int ymm)
{
	int lost = 0;

	for (unsigned int t = 0; t < FPU_TASKS; t++) {
		long pid = SYS3(__NR_fork, 0, 0, 0);

		if (pid < 0)
			fail("fork", pid);
		if (pid == 0)
			sys_exit(fpu_rounds(t + 1, rounds, ymm) ? 1 : 0);
	}
	for (unsigned int t = 0; t < FPU_TASKS; t++) {
		int status = 0;
		long r = SYS6(__NR_wait4, -1, &status, 0, 0, 0, 0);

		if (r < 0)
			fail("wait4", r);
		if (status != 0)
			lost = 1;
	}
	return lost ? "lost" : "kept";
}

static int run_fpu(unsigned int rounds)
{
	unsigned long xcr0 = user_xcr0();
	char num[24];

	put(1, "xcr0=");
	put(1, fmt_uint(num + sizeof(num), xcr0));
	put(1, "\nxmm=");
	put(1, fpu_phase(rounds, 0));
	put(1, "\nymm=");
	put(1, (xcr0 & XCR0_SSE_AVX) == XCR0_SSE_AVX ? fpu_phase(rounds, 1) : "off");
	put(1, "\n");
	return 0;
}

static int run(int argc, char **argv)
{
	if (argc == 3 && str_eq(argv[1], "echo"))
		return run_echo(parse_u32(argv[2]));
	if (argc == 4 && str_eq(argv[1], "connect"))
		return run_connect(parse_u32(argv[2]), parse_u32(argv[3]));
	if (argc == 3 && str_eq(argv[1], "udp-echo"))
		return run_udp_echo(parse_port(argv[2]));
	if (argc == 3 && str_eq(argv[1], "tcp-sink"))
		return run_tcp_sink(parse_port(argv[2]));
	if (argc == 3 && str_eq(argv[1], "mmap"))
		return run_mmap(argv[2]);
	if (argc == 3 && str_eq(argv[1], "watch"))
		return run_watch(argv[2]);
	if (argc == 3 && str_eq(argv[1], "fpu"))
		return run_fpu(parse_u32(argv[2]));
	if (argc == 4 && str_eq(argv[1], "tcp")) {
		unsigned char ip[4];

		parse_ipv4(argv[2], ip);
		return run_tcp(ip, parse_port(argv[3]));
	}
	usage();
}

/* The kernel enters with argc at (%rsp) and argv right above it. */
__asm__(".globl _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start_c\n"
	"	hlt\n");

__attribute__((used, noreturn)) void start_c(long *sp)
{
	sys_exit(run((int)sp[0], (char **)(sp + 1)));
}
