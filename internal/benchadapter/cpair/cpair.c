/*
 * cpair: the C side of BenchmarkLinuxUserPath (userpath_linux_test.go).
 *
 * It runs cnfq's batch loop (../../../../shared/bench/cnfq/cnfq.c: recv,
 * nfq_handle_packet, recv until EAGAIN, one nfq_set_verdict_batch) with
 * libnetfilter_queue, on a socketpair whose other end plays the kernel as
 * the Go benchmark's does: each op writes K packet messages with one
 * sendmmsg (the layout nfq.AppendPacket gives the benchmark's packets:
 * PACKET_HDR, IFINDEX_INDEV, SKB_INFO, a 92-byte PAYLOAD), the loop
 * receives them and sends its verdict, and the verdicts are read every 32
 * ops. The two programs then make the same kernel work apart from the
 * loops' own syscalls, so their ns/op compare the two user-space paths
 * with the syscalls each makes.
 *
 * The library still opens and binds its netlink socket (root needed; queue
 * 7 must be free); the socketpair end is then dup2'ed over that socket.
 * libnfnetlink addresses its sendmsg to a sockaddr_nl, which a unix socket
 * refuses, so this file's sendmsg drops the address for that descriptor.
 *
 *   gcc -O2 -Wall -o /tmp/cpair cpair.c -lnetfilter_queue -lnfnetlink
 *   taskset -c 1 /tmp/cpair K SECONDS      (K packets per op, 1..8)
 *
 * Under valgrind --tool=callgrind it gives the instructions per op too.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

static int vfd = -1;

ssize_t sendmsg(int s, const struct msghdr *m, int flags)
{
	struct msghdr c = *m;
	if (s == vfd) {
		c.msg_name = NULL;
		c.msg_namelen = 0;
	}
	return syscall(SYS_sendmsg, s, &c, flags);
}

static unsigned pending;
static uint32_t last_id;
static unsigned long long verdicts;

static int cb(struct nfq_q_handle *qh, struct nfgenmsg *nfmsg,
	      struct nfq_data *nfa, void *data)
{
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
	(void)qh; (void)nfmsg; (void)data;
	last_id = ph ? ntohl(ph->packet_id) : 0;
	pending++;
	return 0;
}

static void flush_batch(struct nfq_q_handle *qh)
{
	if (!pending)
		return;
	nfq_set_verdict_batch(qh, last_id, NF_ACCEPT);
	verdicts += pending;
	pending = 0;
}

static size_t put_attr(uint8_t *b, uint16_t type, const void *v, uint16_t n)
{
	uint16_t len = 4 + n;
	size_t padded = (len + 3u) & ~3u;
	memcpy(b, &len, 2);
	memcpy(b + 2, &type, 2);
	memcpy(b + 4, v, n);
	memset(b + len, 0, padded - len);
	return padded;
}

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 3 || atoi(argv[1]) < 1 || atoi(argv[1]) > 8) {
		fprintf(stderr, "usage: %s K(1..8) SECONDS\n", argv[0]);
		return 2;
	}
	int k = atoi(argv[1]);
	double secs = atof(argv[2]);
	static char buf[0x10000 + 4096] __attribute__((aligned));
	static char vb[65536];

	struct nfq_handle *h = nfq_open();
	if (!h) { perror("nfq_open"); return 1; }
	struct nfq_q_handle *qh = nfq_create_queue(h, 7, &cb, NULL);
	if (!qh) { perror("nfq_create_queue"); return 1; }
	nfq_set_mode(qh, NFQNL_COPY_PACKET, 0xffff);
	int sp[2];
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sp)) { perror("socketpair"); return 1; }
	int fd = nfq_fd(h);
	if (dup2(sp[0], fd) < 0) { perror("dup2"); return 1; }
	close(sp[0]);
	vfd = fd;

	static uint8_t msgs[8][256];
	size_t mlen = 0;
	uint8_t pkt[92] = {0x45};
	for (int i = 0; i < k; i++) {
		uint8_t *m = msgs[i];
		size_t o = 16;
		uint16_t q = htons(7);
		m[o++] = AF_INET;
		m[o++] = 0;
		memcpy(m + o, &q, 2);
		o += 2;
		uint8_t ph[7] = {0, 0, 0, 0, 0x08, 0x00, NF_INET_LOCAL_IN};
		o += put_attr(m + o, NFQA_PACKET_HDR, ph, sizeof ph);
		uint32_t v = htonl(2);
		o += put_attr(m + o, NFQA_IFINDEX_INDEV, &v, 4);
		v = htonl(NFQA_SKB_CSUMNOTREADY);
		o += put_attr(m + o, NFQA_SKB_INFO, &v, 4);
		o += put_attr(m + o, NFQA_PAYLOAD, pkt, sizeof pkt);
		uint32_t len = o, zero = 0;
		uint16_t type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET, flags = 0;
		memcpy(m, &len, 4);
		memcpy(m + 4, &type, 2);
		memcpy(m + 6, &flags, 2);
		memcpy(m + 8, &zero, 4);
		memcpy(m + 12, &zero, 4);
		mlen = o;
	}
	struct mmsghdr hdrs[8];
	struct iovec iov[8];
	memset(hdrs, 0, sizeof hdrs);
	for (int i = 0; i < k; i++) {
		iov[i].iov_base = msgs[i];
		iov[i].iov_len = mlen;
		hdrs[i].msg_hdr.msg_iov = &iov[i];
		hdrs[i].msg_hdr.msg_iovlen = 1;
	}

	uint32_t id = 1;
	unsigned long long ops = 0;
	int unread = 0;
	double t0 = now_ns(), end = t0 + secs * 1e9, t;
	do {
		for (int r = 0; r < 256; r++) {
			for (int i = 0; i < k; i++) {
				uint32_t be = htonl(id++);
				memcpy(msgs[i] + 24, &be, 4); /* the packet id */
			}
			if (sendmmsg(sp[1], hdrs, k, 0) != k) { perror("sendmmsg"); return 1; }
			/* cnfq's batch loop */
			int rv = recv(fd, buf, sizeof buf, 0);
			if (rv < 0) { perror("recv"); return 1; }
			nfq_handle_packet(h, buf, rv);
			while (pending < 64) {
				rv = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
				if (rv < 0)
					break;
				nfq_handle_packet(h, buf, rv);
			}
			flush_batch(qh);
			if (++unread == 32) {
				int got = 0;
				while (recv(sp[1], vb, sizeof vb, MSG_DONTWAIT) >= 0)
					got++;
				if (got != 32) {
					fprintf(stderr, "%d verdict messages for 32 batches\n", got);
					return 1;
				}
				unread = 0;
			}
			ops++;
		}
		t = now_ns();
	} while (t < end);
	if (verdicts != ops * k) {
		fprintf(stderr, "%llu verdicts, want %llu\n", verdicts, ops * (unsigned long long)k);
		return 1;
	}
	printf("cpair k=%d ops=%llu %.0f ns/op\n", k, ops, (t - t0) / ops);
	return 0;
}
