/*
 * cmon: C's batch NFQUEUE loop with the Go runtime's monitor added, to
 * measure what that monitor alone costs a loop that is not Go (see the
 * measurement log in ../README.md, 2026-11-28).
 *
 * The loop is the shared bench's cnfq -b 64 written again: a blocking recv,
 * non-blocking recvs until EAGAIN or 64 packets, then one
 * nfq_set_verdict_batch for them all. MON selects the monitor:
 *
 *   MON=0 (or unset)  none: the loop alone (an A/A check against cnfq);
 *   MON=1             a second thread that does what sysmon does while a
 *                     goroutine runs without pause: sleep 10 ms (nanosleep,
 *                     sysmon's longest sleep while a P is busy), poll an
 *                     empty epoll set without waiting (netpoll(0), which
 *                     sysmon does when the poller was not polled for 10 ms),
 *                     and every second wake send SIGURG to the reader (the
 *                     preemption of a goroutine that ran 10 ms on one
 *                     scheduling tick; the handler does nothing and has
 *                     SA_RESTART, as the runtime's);
 *   MON=2             the same thread without the signal.
 *
 * RCVTIMEO=N (microseconds, default 0: none) gives the queue socket a
 * receive timeout, as a Go reader that waits in a raw syscall, holding its
 * P, needs so that a signal ends the wait (see internal/nfq's Conn; its
 * hot waits use 1000): each blocking recv that sleeps then arms a timer.
 *
 * Every thread of the process is on the CPU taskset gives it, as the Go
 * daemons' are. It takes the bench adapter's arguments (-q N; the others
 * are ignored: queue length 4096, receive buffer 4 MiB, as simul.sh gives
 * cnfq), so simul.sh runs it through a wrapper:
 *
 *   gcc -O2 -Wall -o /tmp/cmon cmon.c -lnetfilter_queue -lnfnetlink -lpthread
 *   printf '#!/bin/sh\nMON=1 exec /tmp/cmon "$@"\n' > /tmp/cmon1
 *   chmod +x /tmp/cmon1
 *   OURS=/tmp/cmon1 internal/benchadapter/simul.sh 12
 *
 * It exits on SIGTERM or SIGINT and prints daemon_verdicts= and
 * daemon_batches=.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

static volatile sig_atomic_t stop;
static unsigned pending, batches;
static unsigned long long verdicts;
static uint32_t last_id;
static pid_t reader;
static int signals = 1;

static void on_stop(int s) { (void)s; stop = 1; }
static void on_urg(int s, siginfo_t *i, void *c) { (void)s; (void)i; (void)c; }

static int cb(struct nfq_q_handle *qh, struct nfgenmsg *m, struct nfq_data *d, void *a)
{
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(d);
	(void)qh; (void)m; (void)a;
	last_id = ph ? ntohl(ph->packet_id) : 0;
	pending++;
	return 0;
}

static void *monitor(void *arg)
{
	int ep = epoll_create1(0), n = 0;
	struct epoll_event ev;
	sigset_t set;
	(void)arg;
	/* SIGTERM and SIGINT go to the reader, whose recv they end. */
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	while (!stop) {
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
		epoll_wait(ep, &ev, 1, 0);
		if (++n % 2 == 0 && signals)
			syscall(SYS_tgkill, getpid(), reader, SIGURG);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	unsigned queue = 0;
	static char buf[0x10000 + 4096] __attribute__((aligned));
	for (int i = 1; i + 1 < argc; i++)
		if (!strcmp(argv[i], "-q"))
			queue = strtoul(argv[i + 1], NULL, 0);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_stop;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_urg;
	sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
	sigaction(SIGURG, &sa, NULL);
	struct nfq_handle *h = nfq_open();
	if (!h || nfq_bind_pf(h, AF_INET) < 0) { perror("nfq"); return 1; }
	struct nfq_q_handle *qh = nfq_create_queue(h, queue, &cb, NULL);
	if (!qh || nfq_set_mode(qh, NFQNL_COPY_PACKET, 0xffff) < 0 || nfq_set_queue_maxlen(qh, 4096) < 0) { perror("queue"); return 1; }
	nfnl_rcvbufsiz(nfq_nfnlh(h), 4 << 20);
	int fd = nfq_fd(h);
	const char *tmo = getenv("RCVTIMEO");
	if (tmo && atol(tmo) > 0) {
		struct timeval tv = {atol(tmo) / 1000000, atol(tmo) % 1000000};
		if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
			perror("SO_RCVTIMEO");
			return 1;
		}
	}
	reader = syscall(SYS_gettid);
	pthread_t t;
	const char *mon = getenv("MON");
	if (mon && *mon == '2')
		signals = 0;
	if (mon && (*mon == '1' || *mon == '2'))
		pthread_create(&t, NULL, monitor, NULL);
	while (!stop) {
		int rv = recv(fd, buf, sizeof buf, 0);
		if (rv < 0)
			continue;
		nfq_handle_packet(h, buf, rv);
		while (pending < 64) {
			rv = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
			if (rv < 0) {
				if (errno == ENOBUFS)
					continue;
				break;
			}
			nfq_handle_packet(h, buf, rv);
		}
		if (pending) {
			nfq_set_verdict_batch(qh, last_id, NF_ACCEPT);
			verdicts += pending;
			pending = 0;
			batches++;
		}
	}
	printf("daemon_verdicts=%llu\ndaemon_batches=%u\n", verdicts, batches);
	fflush(stdout);
	nfq_destroy_queue(qh);
	nfq_close(h);
	return 0;
}
