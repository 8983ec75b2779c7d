"""What planner shows: plan tables (render), pictures (draw), traces, recorded latencies (stats)
and the findings of `planner validate`."""
