# bash completion for dauthctl (installed as /usr/share/bash-completion/completions/dauthctl).
# Verbs and options come from `dauthctl [VERB...] --help` of the dauthctl being completed, so that the completion
# offers exactly what that binary accepts and cannot drift from it (tests/package/check-completion).

# _dauthctl_parse_help <help text>: sets _dauthctl_verbs, _dauthctl_options and _dauthctl_valued (options that take
# a value) from CLI11's help layout: "Options:" and "Subcommands:" sections of lines "  NAMES [TYPE]  description".
_dauthctl_parse_help() {
  local section="" line names rest
  _dauthctl_verbs=() _dauthctl_options=() _dauthctl_valued=()
  while IFS= read -r line; do
    case $line in
      Options:) section=options; continue ;;
      Subcommands:) section=verbs; continue ;;
      [![:space:]]*) section=""; continue ;;
    esac
    line=${line#"${line%%[![:space:]]*}"}  # leading blanks
    [ -n "$line" ] || continue
    names=${line%%[[:space:]]*}
    rest=${line#"$names"}
    rest=${rest#"${rest%%[![:space:]]*}"}
    case $section in
      verbs) [[ $names == [a-z]* ]] && _dauthctl_verbs+=("$names") ;;
      options)
        [[ $names == -* ]] || continue  # a wrapped description line
        local name
        IFS=, read -ra name <<<"$names"
        _dauthctl_options+=("${name[@]}")
        # A type right after the names (TEXT, INT, UINT:..., TEXT=default) means the option takes a value.
        if [[ $rest =~ ^[A-Z]+([:=]|[[:space:]]|$) ]]; then _dauthctl_valued+=("${name[@]}"); fi
        ;;
    esac
  done <<<"$1"
}

_dauthctl() {
  local cur=${COMP_WORDS[COMP_CWORD]} program=${COMP_WORDS[0]}
  [[ $program == \~/* ]] && program=$HOME/${program:2}  # as typed: the shell has not expanded the tilde yet
  COMPREPLY=()

  # The verb chain typed so far (e.g. "credentials add"): the words that named a subcommand of the one before.
  local chain=() root_options=() root_valued=() i word skip=""
  _dauthctl_parse_help "$("$program" --help 2>/dev/null)"
  root_options=("${_dauthctl_options[@]}") root_valued=("${_dauthctl_valued[@]}")
  for ((i = 1; i < COMP_CWORD; i++)); do
    word=${COMP_WORDS[i]}
    if [ -n "$skip" ]; then skip=""; continue; fi
    if [[ " ${_dauthctl_valued[*]} ${root_valued[*]} " == *" $word "* ]]; then skip=1; continue; fi
    if [[ " ${_dauthctl_verbs[*]} " == *" $word "* ]]; then
      chain+=("$word")
      _dauthctl_parse_help "$("$program" "${chain[@]}" --help 2>/dev/null)"
    fi
  done

  # The value of an option that takes one: a path for -s/--socket and --out, nothing to offer for numbers.
  local previous=${COMP_WORDS[COMP_CWORD - 1]}
  if ((COMP_CWORD > 1)) && [[ " ${_dauthctl_valued[*]} ${root_valued[*]} " == *" $previous "* ]]; then
    case $previous in
      -s | --socket | --out | --*file*) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
    esac
    return 0
  fi

  if [[ $cur == -* ]]; then
    # The global options are accepted after a verb too (dauthctl's fallthrough).
    local -A seen=()
    for word in "${_dauthctl_options[@]}" "${root_options[@]}"; do seen[$word]=1; done
    mapfile -t COMPREPLY < <(compgen -W "${!seen[*]}" -- "$cur")
  else
    mapfile -t COMPREPLY < <(compgen -W "${_dauthctl_verbs[*]}" -- "$cur")
  fi
  return 0
}

complete -F _dauthctl dauthctl
