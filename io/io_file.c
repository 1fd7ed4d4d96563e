/* io_file.c: memory maps and whole-file reads, with messages naming the file. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io.h"

lv_status io_map_open(io_map *m, const char *path)
{
    lv_status st = LV_OK;
    int fd = -1;
    m->data = NULL;
    m->size = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) LV_FAIL(LV_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) LV_FAIL(LV_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode)) LV_FAIL(LV_ERR_IO, "%s: not a regular file", path);
    if (sb.st_size == 0) goto done;
    void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) LV_FAIL(LV_ERR_IO, "%s: cannot mmap: %s", path, strerror(errno));
    m->data = p;
    m->size = (size_t)sb.st_size;
done:
    if (fd >= 0) close(fd);
    return st;
}

void io_map_close(io_map *m)
{
    if (!m) return;
    if (m->data) munmap(m->data, m->size);
    m->data = NULL;
    m->size = 0;
}

lv_status io_read_file(const char *path, char **buf, size_t *size)
{
    lv_status st = LV_OK;
    FILE *f = NULL;
    char *b = NULL;
    *buf = NULL;
    *size = 0;
    f = fopen(path, "rb");
    if (!f) LV_FAIL(LV_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0) LV_FAIL(LV_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode)) LV_FAIL(LV_ERR_IO, "%s: not a regular file", path);
    size_t n = (size_t)sb.st_size;
    LV_ALLOC(b, n + 1);
    if (n && fread(b, 1, n, f) != n)
        LV_FAIL(LV_ERR_IO, "%s: short read (%zu bytes expected)", path, n);
    b[n] = '\0';
    *buf = b;
    *size = n;
    b = NULL;
done:
    free(b);
    if (f) fclose(f);
    return st;
}
