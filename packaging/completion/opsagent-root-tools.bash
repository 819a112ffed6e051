# bash completion for opsagent-helper and opsagent-upgrade, the two root programs.
# Installed under both names (bash-completion loads a file by the command's name).
# Their options are read from the program's own --help when completing, so this file
# cannot fall behind the program (the helper crate does not link the daemon's generator
# of `opsagent completion bash`).
_opsagent_root_tool() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    COMPREPLY=()
    if [[ $cur == -* ]]; then
        local opts
        opts=$("${COMP_WORDS[0]}" --help 2>/dev/null | grep -oE -- '--[a-z][a-z0-9-]*' | sort -u)
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    fi
}
complete -F _opsagent_root_tool opsagent-helper opsagent-upgrade
