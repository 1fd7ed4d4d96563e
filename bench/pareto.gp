# Pareto plot: total bits per weight vs perplexity (log scale), one point per
# quality-table row, from the .dat file tools/results_report.py writes:
# columns bpw ppl kind_index label. Called by bench/run_all.sh with
# datafile and outfile set.
set terminal pngcairo size 900,600 font ",10"
set output outfile
set title "stories260K on TinyStories validation: perplexity vs total bits per weight"
set xlabel "total bits per weight (codes + codebooks + scales)"
set ylabel "perplexity (log scale)"
set logscale y
set grid
set key top right
set xrange [1.5:6]
plot datafile using 1:($3==0?$2:1/0) with points pt 7 ps 1.5 title "round-to-nearest g32", \
     datafile using 1:($3==1?$2:1/0) with points pt 5 ps 1.5 title "per-matrix codebooks", \
     datafile using 1:($3==2?$2:1/0) with points pt 9 ps 1.5 title "shared codebooks", \
     datafile using 1:($3==3?$2:1/0) with lines lw 2 dt 2 title "FP (float32)", \
     datafile using 1:($3<3?$2:1/0):4 with labels offset 0,1 font ",8" notitle
