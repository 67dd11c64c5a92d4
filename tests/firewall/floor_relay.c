/* The floor of a user-mode relay on nfgate's datapath: a compiled stand-in for
 * a TCP gateway, for the benches only (tests/firewall/floor.py).
 *
 *   floor_relay PID FD
 *
 * Takes the gateway's listening socket (fd FD of process PID, by
 * pidfd_getfd(2); the bench stops that process while this one serves), and
 * per accepted leg A connects leg B from the listening address to leg A's
 * peer (F:f, as every nfgate gateway does: the processor binds it to the
 * server), then relays bytes both ways until both have ended. No signalling,
 * no log, no limit: only the per-connection system calls any relay makes
 * (accept, socket, bind, connect, reads, writes, shutdowns, closes). One
 * thread, epoll. Not a gateway: nothing here may ever carry real traffic. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAXFD 65536
static int peer[MAXFD];        /* the other leg, or -1 */
static char ended[MAXFD];      /* this leg has sent its FIN to us */
static char connecting[MAXFD]; /* leg B, until its connect completes */

static void forget(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    peer[fd] = -1;
    ended[fd] = connecting[fd] = 0;
}

static void close_pair(int ep, int fd) {
    int other = peer[fd];
    forget(ep, fd);
    if (other >= 0)
        forget(ep, other);
}

static void watch(int ep, int op, int fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, op, fd, &ev);
}

static void accept_all(int ep, int listener, const struct sockaddr_in *local) {
    for (;;) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        int a = accept4(listener, (struct sockaddr *)&from, &len, SOCK_NONBLOCK);
        if (a < 0)
            return;
        int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (a >= MAXFD || b < 0 || b >= MAXFD) {
            close(a);
            if (b >= 0)
                close(b);
            continue;
        }
        struct sockaddr_in src = *local;
        int one = 1;
        src.sin_port = 0;
        setsockopt(b, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(b, (struct sockaddr *)&src, sizeof src) < 0 ||
            (connect(b, (struct sockaddr *)&from, sizeof from) < 0 && errno != EINPROGRESS)) {
            close(a);
            close(b);
            continue;
        }
        peer[a] = b;
        peer[b] = a;
        connecting[b] = 1;
        watch(ep, EPOLL_CTL_ADD, b, EPOLLOUT);
    }
}

static void readable(int ep, int fd, char *buf, size_t size) {
    for (;;) {
        ssize_t got = read(fd, buf, size);
        if (got > 0) {
            /* Small messages in the benches: a short write is retried at once. */
            for (ssize_t off = 0; off < got;) {
                ssize_t put = write(peer[fd], buf + off, got - off);
                if (put < 0 && errno != EAGAIN) {
                    close_pair(ep, fd);
                    return;
                }
                if (put > 0)
                    off += put;
            }
            continue;
        }
        if (got == 0) {
            ended[fd] = 1;
            shutdown(peer[fd], SHUT_WR);
            if (ended[peer[fd]])
                close_pair(ep, fd);
            else
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            return;
        }
        if (errno != EAGAIN)
            close_pair(ep, fd);
        return;
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: floor_relay PID FD\n");
        return 2;
    }
    int pidfd = syscall(SYS_pidfd_open, atoi(argv[1]), 0);
    int listener = pidfd < 0 ? -1 : syscall(SYS_pidfd_getfd, pidfd, atoi(argv[2]), 0);
    if (listener < 0) {
        perror("floor_relay: pidfd");
        return 1;
    }
    fcntl(listener, F_SETFL, O_NONBLOCK);
    struct sockaddr_in local;
    socklen_t len = sizeof local;
    if (getsockname(listener, (struct sockaddr *)&local, &len) < 0 || local.sin_family != AF_INET) {
        fprintf(stderr, "floor_relay: fd %s of %s is not an IPv4 socket\n", argv[2], argv[1]);
        return 1;
    }
    for (int i = 0; i < MAXFD; i++)
        peer[i] = -1;
    int ep = epoll_create1(0);
    watch(ep, EPOLL_CTL_ADD, listener, EPOLLIN);
    static char buf[1 << 16];
    struct epoll_event events[256];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                accept_all(ep, listener, &local);
            } else if (peer[fd] < 0) {
                continue; /* closed earlier in this batch */
            } else if (connecting[fd]) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) {
                    close_pair(ep, fd);
                    continue;
                }
                connecting[fd] = 0;
                watch(ep, EPOLL_CTL_MOD, fd, EPOLLIN);
                watch(ep, EPOLL_CTL_ADD, peer[fd], EPOLLIN);
            } else {
                readable(ep, fd, buf, sizeof buf);
            }
        }
    }
}
