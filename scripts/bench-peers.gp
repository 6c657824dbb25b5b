# s3mount's advantage over each peer, per workload (from scripts/bench-peers).
# gnuplot -e "datafile='...'; outfile='...'" scripts/bench-peers.gp
set terminal pngcairo size 1200,600 noenhanced
set output outfile
set datafile missing "?"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set logscale y 2
set yrange [0.0625:128]
set ylabel "s3mount advantage (x, log scale; above 1: s3mount better)"
set xtics rotate by -30
set bmargin 6
set rmargin 8
set key top left
set grid ytics
set arrow from graph 0, first 1 to graph 1, first 1 nohead lw 2 lc rgb "black"
set title "s3mount compared with its peers (median of each workload)"
plot datafile using 2:xtic(1) title columnheader(2), \
     '' using 3 title columnheader(3), \
     '' using 4 title columnheader(4)
