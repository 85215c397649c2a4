/* A minimal getaddrinfo client for the integration tests. Built with `musl-gcc -static`, it
 * resolves like a program in an Alpine image: musl's stub resolver sends the A and AAAA queries
 * together from one socket and resends them on that socket when no answer comes. Built with the
 * system compiler it is the same program on glibc's resolver.
 *
 * Prints one address a line on stdout, and on stderr how long getaddrinfo took (CLOCK_MONOTONIC,
 * the kernel's packet clock) as `getaddrinfo_ns <n>`, also when it fails. */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 2;
    }
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    struct addrinfo *res = NULL;
    long long start = now_ns();
    int rc = getaddrinfo(argv[1], NULL, &hints, &res);
    long long took = now_ns() - start;
    fprintf(stderr, "getaddrinfo_ns %lld\n", took);
    if (rc != 0) {
        fprintf(stderr, "getaddrinfo %s: %s\n", argv[1], gai_strerror(rc));
        return 1;
    }
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        char buf[INET6_ADDRSTRLEN];
        const void *addr;
        if (ai->ai_family == AF_INET) {
            addr = &((const struct sockaddr_in *)ai->ai_addr)->sin_addr;
        } else if (ai->ai_family == AF_INET6) {
            addr = &((const struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
        } else {
            continue;
        }
        if (inet_ntop(ai->ai_family, addr, buf, sizeof buf) == NULL) {
            perror("inet_ntop");
            freeaddrinfo(res);
            return 1;
        }
        printf("%s\n", buf);
    }
    freeaddrinfo(res);
    return 0;
}
