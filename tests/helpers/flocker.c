/* flocker: flock(2) from inside a test container (Debian's busybox has no flock applet).
 *   flocker try FILE            LOCK_EX|LOCK_NB: prints "locked" (exit 0) or "busy" (exit 1)
 *   flocker hold FILE MARK SECS LOCK_EX, creates MARK, sleeps SECS, exits (lock released)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) { fputs("usage: flocker try|hold FILE [MARK SECS]\n", stderr); return 2; }
    int fd = open(argv[2], O_RDWR | O_CREAT, 0644);
    if (fd < 0) { perror("open"); return 2; }
    if (strcmp(argv[1], "try") == 0) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) { puts("locked"); return 0; }
        if (errno == EWOULDBLOCK) { puts("busy"); return 1; }
        perror("flock"); return 2;
    }
    if (strcmp(argv[1], "hold") == 0 && argc == 5) {
        if (flock(fd, LOCK_EX) != 0) { perror("flock"); return 2; }
        close(open(argv[3], O_WRONLY | O_CREAT, 0644));
        sleep((unsigned)atoi(argv[4]));
        return 0;
    }
    fputs("usage: flocker try|hold FILE [MARK SECS]\n", stderr);
    return 2;
}
