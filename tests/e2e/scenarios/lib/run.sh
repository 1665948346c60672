# The scenario runner shared by the suites (included by run.sh through
# '# e2e-include: lib/run.sh'; uses the including script's log helper and STATE/RESULTS).

# run_selected: runs the scenarios in the array `selected` ("name:function" entries), each in a
# subshell, and writes PASS/FAIL and TIME lines to RESULTS; counts failures in `failed`. A kernel
# oops, BUG or warning in the guest's dmesg during a scenario fails it, whatever the scenario saw.
run_selected() {
    local s name fn t0 rc dt dmesg_mark oops reason reason_before
    failed=0
    for s in "${selected[@]}"; do
        name=${s%%:*} fn=${s#*:}
        rm -f "$STATE/reason"
        log "BEGIN $name"
        t0=$(date +%s)
        dmesg_mark=$(dmesg | wc -l)
        ( E2E_SCENARIO=$name; "$fn" )
        rc=$?
        dt=$(( $(date +%s) - t0 ))
        oops=$(dmesg | tail -n +"$(( dmesg_mark + 1 ))" | grep -m1 -E 'kernel BUG|Oops|BUG:|usercopy:|WARNING: CPU|general protection fault|hung_task|blocked for more than')
        if [[ -n $oops ]]; then
            [[ -e $STATE/reason ]] && reason_before=" (and: $(cat "$STATE/reason"))" || reason_before=""
            echo "guest kernel: $oops$reason_before" > "$STATE/reason"
            rc=1
        fi
        if [[ $rc == 0 ]]; then
            log "END $name: PASS (${dt}s)"
            echo "PASS $name" > "$RESULTS"
        else
            reason=$(cat "$STATE/reason" 2>/dev/null || echo "exited rc=$rc")
            log "END $name: FAIL (${dt}s): $reason"
            echo "FAIL $name: $reason" > "$RESULTS"
            failed=$(( failed + 1 ))
        fi
        echo "TIME $name ${dt}s" > "$RESULTS"
    done
}
