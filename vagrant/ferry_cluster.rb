# The shape of the Vagrant cluster (nodes, addresses, roles) and the cluster
# description file the test suite reads (format: docs/local-cluster.md).
# Kept apart from the Vagrantfile so CI can check it with plain Ruby.
require "yaml"

module FerryCluster
  POOL = "ferry".freeze
  # The libvirt box vagrant/build-box.sh adds (FERRY_BOX=ferry-local).
  LOCAL_BOX = "ferry-local".freeze
  AGENT_PORT = 7480
  CONTROL_PORT = 7070
  ETCD_CLIENT_PORT = 2379
  MAX_ETCD_MEMBERS = 3
  MAX_NODES = 9 # addresses .11 to .19
  PLUGIN_SOCKET = "/run/docker/plugins/ferry.sock".freeze
  MOUNT_ROOT = "/var/lib/ferry/mnt".freeze
  # provision.sh makes each node's dockerd listen here too, without TLS, on the
  # private network only: the suite and the migration scenario drive Docker
  # from the host machine through it.
  DOCKER_TCP_PORT = 2375

  Node = Struct.new(:name, :address, keyword_init: true)

  def self.node_count(value)
    count = Integer(value || "3", exception: false)
    unless count && count.between?(1, MAX_NODES)
      raise ArgumentError, "FERRY_NODES=#{value.inspect}: give a whole number from 1 to #{MAX_NODES}"
    end
    count
  end

  def self.nodes(count, subnet)
    (1..count).map { |i| Node.new(name: "node#{i}", address: "#{subnet}.#{10 + i}") }
  end

  # The first three nodes (or all of them when fewer) run an etcd member.
  def self.etcd_members(nodes)
    nodes.first(MAX_ETCD_MEMBERS)
  end

  def self.control_node(nodes)
    nodes.first
  end

  def self.description(nodes, vagrant_dir:, certs_dir:)
    {
      "version" => 1,
      "name" => "vagrant",
      "kind" => "vagrant",
      "etcd" => {
        "endpoints" => etcd_members(nodes).map { |n| "#{n.address}:#{ETCD_CLIENT_PORT}" },
        "log" => nil, # journalctl -u ferry-etcd on node1..node3
      },
      "control" => {
        "address" => "#{control_node(nodes).address}:#{CONTROL_PORT}",
        "log" => nil, # journalctl -u ferry-control on node1
      },
      "tls" => {
        "insecure" => false,
        "dir" => certs_dir,
        "ca" => File.join(certs_dir, "ca.crt"),
        "user_cert" => File.join(certs_dir, "admin.crt"),
        "user_key" => File.join(certs_dir, "admin.key"),
        "etcd_root_cert" => File.join(certs_dir, "root.crt"),
        "etcd_root_key" => File.join(certs_dir, "root.key"),
      },
      "hosts" => nodes.map { |n| host_entry(n, vagrant_dir) },
    }
  end

  def self.host_entry(node, vagrant_dir)
    {
      "name" => node.name,
      "address" => node.address,
      # VAGRANT_CWD lets the suite run from any directory.
      "run" => ["env", "VAGRANT_CWD=#{vagrant_dir}", "vagrant", "ssh", node.name, "--", "sudo"],
      "pool" => POOL,
      "agent" => "#{node.address}:#{AGENT_PORT}",
      "plugin_socket" => PLUGIN_SOCKET,
      "mount_root" => MOUNT_ROOT,
      "docker_host" => "tcp://#{node.address}:#{DOCKER_TCP_PORT}",
      "logs" => { "agent" => nil, "docker" => nil }, # journalctl -u ferry-agent / -u docker
    }
  end

  # Writes the description only when it changed; returns true if it wrote.
  def self.write(path, description)
    text = "# Written by vagrant/Vagrantfile; see docs/local-cluster.md.\n" + description.to_yaml
    return false if File.exist?(path) && File.read(path) == text

    File.write(path, text)
    true
  end
end
