/* spill.c: activation buffers in RAM or in a node-local scratch file
 * (run.scratch_dir). A spilled buffer is a shared mapping of a file created in
 * the scratch directory and unlinked at once: the kernel pages it to that disk
 * under memory pressure, nothing is left behind when the process dies, and the
 * code using it sees ordinary memory. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "quantize_impl.h"

lv_status pipe_buf_alloc(pipe_buf *b, size_t n_floats, const char *scratch_dir, const char *what)
{
    lv_status st = LV_OK;
    int fd = -1;
    char path[4200];
    memset(b, 0, sizeof *b);
    const size_t bytes = (n_floats ? n_floats : 1) * sizeof(float);
    if (!scratch_dir || !scratch_dir[0]) {
        LV_ALLOC(b->p, n_floats ? n_floats : 1);
        b->n = n_floats;
        goto done;
    }
    static unsigned serial = 0;
    if (snprintf(path, sizeof path, "%s/llmvq-%s-%ld-%u.spill", scratch_dir, what, (long)getpid(),
                 serial++) >= (int)sizeof path)
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: run.scratch_dir path too long", scratch_dir);
    fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        LV_FAIL(LV_ERR_IO, "%s: cannot create a spill file in run.scratch_dir: %s", path,
                strerror(errno));
    unlink(path); /* the mapping keeps it alive; nothing is left after the process */
    if (ftruncate(fd, (off_t)bytes) != 0)
        LV_FAIL(LV_ERR_IO, "%s: cannot size the spill file to %zu bytes: %s", path, bytes,
                strerror(errno));
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        LV_FAIL(LV_ERR_IO, "%s: cannot map the spill file (%zu bytes): %s", path, bytes,
                strerror(errno));
    b->p = p;
    b->n = n_floats;
    b->mapped = bytes;
done:
    if (fd >= 0) close(fd);
    return st;
}

void pipe_buf_free(pipe_buf *b)
{
    if (!b) return;
    if (b->mapped)
        munmap(b->p, b->mapped);
    else
        free(b->p);
    memset(b, 0, sizeof *b);
}
