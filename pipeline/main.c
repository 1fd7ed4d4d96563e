/* main.c: the llmvq program: subcommand dispatch. The only place that exits. */
#include <stdio.h>
#include <string.h>

#include "lv.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: llmvq COMMAND [ARGS]\n"
            "\n"
            "commands:\n"
            "  eval      perplexity of a model on a text or token file\n"
            "  generate  sample text from a model\n"
            "  convert   convert a llama2.c .bin model to a Hugging Face directory\n"
            "  synth     write a model with random weights in real shapes\n"
            "\n"
            "Run 'llmvq COMMAND --help' for a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "llmvq: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
