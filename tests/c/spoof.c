/* spoof DIR NEWROOT FILE DATA: keep DIR open, chroot into NEWROOT (a directory the guest
 * named like another guest's root), then append DATA to FILE through the kept directory
 * descriptor.  Exit 0 if the write went anywhere, 3 if the open was refused. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 5)
        return 2;
    int d = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (d < 0 || chroot(argv[2]) != 0 || chdir("/") != 0) {
        perror("spoof: setup");
        return 2;
    }
    int f = openat(d, argv[3], O_WRONLY | O_APPEND);
    if (f < 0) {
        perror("spoof: open");
        return 3;
    }
    if (write(f, argv[4], strlen(argv[4])) < 0) {
        perror("spoof: write");
        return 4;
    }
    return 0;
}
