/* progress.c: one progress stream for a sharded quantize job, on rank 0, and
 * the end-of-shard rendezvous that waits as long as the slowest shard needs.
 *
 * Every rank reports each finished block to rank 0 (a small message); rank 0
 * prints one line per block of the whole model, whoever computed it, with the
 * elapsed time and an ETA (the largest over the ranks of that rank's time per
 * block times its blocks left). Rank 0 reads the reports between its own
 * blocks and, once its shard is done, waits for the others' DONE messages.
 *
 * Liveness: a fixed deadline on "wait until the other shards finish" would
 * fail long jobs whose shards take different times, and no deadline would hang
 * forever on a stuck rank. Here a working rank is declared dead only when it
 * has been silent for longer than max(comm timeout, 3 x the longest block seen
 * so far); ranks that finished early wait for rank 0's verdict, which sends
 * them a heartbeat every 30 s (or a third of the comm timeout), and give up
 * when rank 0 is silent for longer than the same limit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pipe.h"
#include "pipe_plan.h"
#include "quantize_impl.h"

enum { PROG_TAG = 7101, VERDICT_TAG = 7102 };
enum { PROG_BLOCK = 1, PROG_DONE = 2, PROG_HEARTBEAT = 3, PROG_VERDICT = 4 };
#define PROG_HEARTBEAT_S 30.0

typedef struct {
    int32_t kind, layer, resumed, status;
    double block_mse, elapsed, block_s;
    double rel_err[LV_LIN_COUNT];
} prog_msg;

static void prog_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

lv_status pipe_progress_init(pipe_progress *p, comm_ctx *comm, int n_layers, double t_start,
                             int rank_logs)
{
    lv_status st = LV_OK;
    memset(p, 0, sizeof *p);
    p->comm = comm;
    p->size = comm_size(comm);
    p->rank = comm_rank(comm);
    p->n_layers = n_layers;
    p->t_start = t_start;
    p->rank_logs = rank_logs;
    p->first_bad = -1;
    if (p->rank == 0) {
        LV_ALLOC(p->done, (size_t)p->size);
        LV_ALLOC(p->total, (size_t)p->size);
        LV_ALLOC(p->finished, (size_t)p->size);
        LV_ALLOC(p->last_heard, (size_t)p->size);
        LV_ALLOC(p->per_block, (size_t)p->size);
        for (int r = 0; r < p->size; r++) {
            int f, l;
            pipe_shard_of(n_layers, r, p->size, &f, &l);
            p->total[r] = l - f;
            p->last_heard[r] = lv_now();
        }
    }
done:
    return st;
}

void pipe_progress_free(pipe_progress *p)
{
    free(p->done);
    free(p->total);
    free(p->finished);
    free(p->last_heard);
    free(p->per_block);
    memset(p, 0, sizeof *p);
}

/* Rank 0: one line for a finished block of rank `from`. */
static void prog_print(pipe_progress *p, int from, const prog_msg *m)
{
    p->n_done++;
    p->done[from]++;
    p->per_block[from] = m->elapsed / p->done[from];
    if (m->block_s > p->longest_block) p->longest_block = m->block_s;
    double eta = 0.0, mean = 0.0;
    int known = 0;
    for (int r = 0; r < p->size; r++)
        if (p->done[r] > 0) mean += p->per_block[r], known++;
    mean = known ? mean / known : 0.0;
    for (int r = 0; r < p->size; r++) {
        double left = (p->done[r] > 0 ? p->per_block[r] : mean) * (p->total[r] - p->done[r]);
        if (left > eta) eta = left;
    }
    char who[32] = "";
    if (p->size > 1) snprintf(who, sizeof who, " (rank %d)", from);
    lv_log("block %d/%d %s%s  %d of %d done, %.1f s elapsed, ETA %.1f s  block rel MSE %.4g  "
           "layer err q %.3f k %.3f v %.3f o %.3f gate %.3f down %.3f up %.3f", m->layer + 1,
           p->n_layers, m->resumed ? "resumed" : "done   ", who, p->n_done, p->n_layers,
           lv_now() - p->t_start, eta, m->block_mse, m->rel_err[0], m->rel_err[1],
           m->rel_err[2], m->rel_err[3], m->rel_err[4], m->rel_err[5], m->rel_err[6]);
}

/* Rank 0: tell the ranks that finished early and wait for the verdict that it
 * is alive, with the longest block seen (they scale their patience by it);
 * at most every PROG_HEARTBEAT_S unless forced. */
static lv_status prog_heartbeat(pipe_progress *p, int force)
{
    lv_status st = LV_OK;
    const double now = lv_now();
    const double period = comm_timeout(p->comm) / 3.0 < PROG_HEARTBEAT_S
                              ? comm_timeout(p->comm) / 3.0 : PROG_HEARTBEAT_S;
    if (!force && now - p->last_beat < period) goto done;
    prog_msg hb = {.kind = PROG_HEARTBEAT, .block_s = p->longest_block};
    for (int r = 1; r < p->size; r++)
        if (p->finished[r]) LV_TRY(comm_send(p->comm, &hb, sizeof hb, r, VERDICT_TAG));
    p->last_beat = now;
done:
    return st;
}

/* Rank 0: handle every report waiting now. */
static lv_status prog_drain(pipe_progress *p)
{
    lv_status st = LV_OK;
    for (;;) {
        prog_msg m;
        int src = -1, got = 0;
        LV_TRY(comm_try_recv(p->comm, &m, sizeof m, PROG_TAG, &src, &got));
        if (!got) break;
        p->last_heard[src] = lv_now();
        if (m.kind == PROG_BLOCK) {
            prog_print(p, src, &m);
        } else if (m.kind == PROG_DONE) {
            p->finished[src] = 1;
            if (m.status != LV_OK && p->first_bad < 0) p->first_bad = src;
        }
    }
    LV_TRY(prog_heartbeat(p, 0));
done:
    return st;
}

lv_status pipe_progress_block(pipe_progress *p, int layer, const lv_qblock *b, int resumed,
                              double block_s)
{
    lv_status st = LV_OK;
    prog_msg m = {.kind = PROG_BLOCK, .layer = layer, .resumed = resumed,
                  .block_mse = b->block_mse, .elapsed = lv_now() - p->t_start,
                  .block_s = block_s};
    memcpy(m.rel_err, b->rel_err, sizeof m.rel_err);
    if (block_s > p->longest_block) p->longest_block = block_s;
    if (p->rank == 0) {
        prog_print(p, 0, &m);
        LV_TRY(prog_drain(p));
    } else {
        LV_TRY(comm_send(p->comm, &m, sizeof m, 0, PROG_TAG));
        if (p->rank_logs) /* otherwise this rank's lv_log is off anyway */
            lv_log("block %d/%d %s  %.1f s elapsed  block rel MSE %.4g", layer + 1, p->n_layers,
                   resumed ? "resumed" : "done", m.elapsed, m.block_mse);
    }
done:
    return st;
}

lv_status pipe_progress_finish(pipe_progress *p, lv_status local)
{
    lv_status st = LV_OK;
    const double timeout = comm_timeout(p->comm);
    if (p->size == 1) return LV_OK;
    if (p->rank != 0) {
        prog_msg m = {.kind = PROG_DONE, .status = (int32_t)local};
        LV_TRY(comm_send(p->comm, &m, sizeof m, 0, PROG_TAG));
        double heard = lv_now(), longest = p->longest_block;
        for (;;) { /* wait for the verdict; rank 0 sends heartbeats meanwhile */
            int src = -1, got = 0;
            LV_TRY(comm_try_recv(p->comm, &m, sizeof m, VERDICT_TAG, &src, &got));
            if (got && m.kind == PROG_VERDICT) break;
            if (got) {
                heard = lv_now();
                if (m.block_s > longest) longest = m.block_s;
            }
            const double limit = timeout > 3.0 * longest ? timeout : 3.0 * longest;
            if (lv_now() - heard > limit)
                LV_FAIL(LV_ERR_MPI, "waiting for rank 0 after this shard: no word for %.0f s "
                        "(limit: the comm timeout or 3x the longest block): rank 0 died or "
                        "stopped answering", lv_now() - heard);
            prog_sleep_ms(20);
        }
        goto done;
    }
    /* rank 0 */
    p->finished[0] = 1;
    for (;;) {
        LV_TRY(prog_drain(p));
        int all = 1;
        for (int r = 0; r < p->size; r++) all &= p->finished[r];
        if (all) break;
        const double now = lv_now(), limit = timeout > 3.0 * p->longest_block
                                                 ? timeout : 3.0 * p->longest_block;
        for (int r = 1; r < p->size; r++)
            if (!p->finished[r] && now - p->last_heard[r] > limit)
                LV_FAIL(LV_ERR_MPI, "rank %d sent no progress for %.0f s (limit: the comm "
                        "timeout or 3x the longest block so far): it died or stopped answering",
                        r, now - p->last_heard[r]);
        prog_sleep_ms(20);
    }
    prog_msg v = {.kind = PROG_VERDICT};
    for (int r = 1; r < p->size; r++) LV_TRY(comm_send(p->comm, &v, sizeof v, r, VERDICT_TAG));
done:
    return st;
}
