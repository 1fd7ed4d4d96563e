/* signals.c: SIGTERM and SIGUSR1 (Slurm's preemption warning) ask the run to
 * stop at its next safe point (between blocks); the program then exits with
 * status 75 after everything finished is checkpointed. A second signal does
 * not kill it: stopping early would lose the block in flight for nothing. */
#include <signal.h>
#include <string.h>

#include "pipe.h"

static volatile sig_atomic_t g_stop = 0;

static void on_signal(int sig) { g_stop = sig; }

void pipe_signals_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
}

int pipe_stop_requested(void) { return g_stop != 0; }
