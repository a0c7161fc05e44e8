/* hammer PATH SECONDS: for SECONDS, try every way a guest has to change the inode its name
 * PATH holds: open for writing (then pwrite, ftruncate), open with O_TRUNC, truncate(2),
 * chmod to set-uid, chown, setxattr, utimes.  Prints one line per success: "fd" when it got
 * a writable descriptor, "wrote", "truncated", "meta" (counts at the end). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    const char *p = argv[1];
    time_t end = time(NULL) + atoi(argv[2]);
    long tries = 0, fds = 0, wrote = 0, trunc = 0, meta = 0;
    struct timeval tv[2] = {{5, 0}, {5, 0}};
    while (time(NULL) < end) {
        for (int i = 0; i < 1000; i++, tries++) {
            int fd = open(p, O_RDWR);
            if (fd >= 0) {
                fds++;
                if (pwrite(fd, "EVIL", 4, 0) == 4)
                    wrote++;
                if (ftruncate(fd, 1) == 0)
                    trunc++;
                close(fd);
            }
            fd = open(p, O_WRONLY | O_TRUNC);
            if (fd >= 0) {
                fds++;
                close(fd);
            }
            if (truncate(p, 0) == 0)
                trunc++;
            if (chmod(p, 04777) == 0)
                meta++;
            if (chown(p, 1234, 1234) == 0)
                meta++;
            if (setxattr(p, "user.evil", "1", 1, 0) == 0)
                meta++;
            if (utimes(p, tv) == 0)
                meta++;
        }
    }
    printf("tries %ld fds %ld wrote %ld truncated %ld meta %ld\n", tries, fds, wrote, trunc,
           meta);
    return 0;
}
