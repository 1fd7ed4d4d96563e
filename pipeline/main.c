/* main.c: the llmvq program: subcommand dispatch. The only place that exits. */
#include <stdio.h>
#include <string.h>

#include "lv.h"
#include "pipe.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} command;

static const command commands[] = {
    {"quantize", pipe_cmd_quantize, "quantize a model to ~2 bits per weight (AQLM) from a job file"},
    {"plan", pipe_cmd_plan, "dry run of a quantize job: shards, memory per rank, predicted time"},
    {"inspect", pipe_cmd_inspect, "what a run has checkpointed, what is left; verify checksums"},
    {"eval", pipe_cmd_eval, "perplexity of a model on a text or token file"},
    {"generate", pipe_cmd_generate, "sample text from a model"},
    {"export", pipe_cmd_export, "write a quantized model for another runtime (HF AQLM directory)"},
    {"convert", pipe_cmd_convert, "convert a model (llama2.c .bin <-> Hugging Face directory)"},
    {"synth", pipe_cmd_synth, "write a model with random weights in real shapes (benchmarks)"},
    {"bench", pipe_cmd_bench, "time the quantized kernels against fp32 (bench gemv)"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: llmvq COMMAND [ARGS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nRun 'llmvq COMMAND --help' for a command's options.\n"
               "Exit status: 0 success, 1 error, 2 usage, 75 stopped by a signal "
               "(work checkpointed).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return PIPE_EXIT_USAGE;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return PIPE_EXIT_OK;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("llmvq 0.1.0\n");
        return PIPE_EXIT_OK;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 2, argv + 2);
    fprintf(stderr, "llmvq: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return PIPE_EXIT_USAGE;
}
